/**
 * @strata/node/client: the control API client alone, for the CLIs that talk to a running p2pd. It loads no
 * libp2p: importing `@strata/node` itself costs about 0.3 s of start-up, which p2p-mount and p2pctl must
 * not pay on every call.
 */
export type { ControlClient } from './control.js'
export { createControlClient } from './control.js'
export { ControlRemoteError, ControlSocketError, ControlUnavailableError } from './errors.js'
