import { StrataError } from '@strata/base'

/**
 * A request the service refuses. `name` and `status` are what p2pd's control API answers (HTTP status, the
 * error's name in the JSON body) and what p2p-mount acts on (`MountGone`, `MountBusy`, `Forbidden`): stable, and
 * older than the `...Error` names of the error template, so they stay as they are.
 */
export interface Refusal extends StrataError {
  status: number
}

export function refusal(name: string, status: number, message: string, hint?: string): Refusal {
  return Object.assign(new StrataError(message, { hint }), { name, status, code: `ERR_${name.toUpperCase()}` })
}
