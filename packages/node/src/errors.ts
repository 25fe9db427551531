import { StrataError } from '@strata/base'

/** The node's failure modes: one class each, matched by `name` (stable `code` for scripts). */

/** A peer broke the chunk protocol (bad frame, over a limit, unknown request). */
export class ProtocolError extends StrataError {
  override name = 'ProtocolError'
  override readonly code = 'ERR_CHUNK_PROTOCOL'
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
  }
}

/** A peer answered a request with an error frame (busy, too large, internal failure). */
export class PeerRefusedError extends StrataError {
  override name = 'PeerRefusedError'
  override readonly code = 'ERR_PEER_REFUSED'
  constructor(
    message: string,
    readonly reason: string
  ) {
    super(message)
  }
}

/** A request to a peer took longer than its timeout. */
export class PeerTimeoutError extends StrataError {
  override name = 'PeerTimeoutError'
  override readonly code = 'ERR_PEER_TIMEOUT'
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
  }
}

/** The node's identity key file exists but cannot be used. */
export class IdentityError extends StrataError {
  override name = 'IdentityError'
  override readonly code = 'ERR_NODE_IDENTITY'
  override readonly hint: string
  constructor(path: string, options?: { cause?: unknown }) {
    super(`cannot read the node's identity key ${path}`, options)
    this.hint = `check the file's permissions, or move it away to give the node a new peer id`
  }
}

/** The pre-shared key file of the private network cannot be used. */
export class PreSharedKeyError extends StrataError {
  override name = 'PreSharedKeyError'
  override readonly code = 'ERR_PSK'
  override readonly hint =
    'the file must be a libp2p swarm key: "/key/swarm/psk/1.0.0/", "/base16/", then 64 hex digits'
  constructor(path: string, options?: { cause?: unknown }) {
    super(`cannot use the pre-shared key file ${path}`, options)
  }
}

/** The control socket cannot be opened. */
export class ControlSocketError extends StrataError {
  override name = 'ControlSocketError'
  override readonly code = 'ERR_CONTROL_SOCKET'
  override readonly hint: string
  constructor(path: string, options?: { cause?: unknown; hint?: string }) {
    super(`cannot listen on the control socket ${path}`, options)
    this.hint = options?.hint ?? 'is another p2pd running? pass --socket PATH to use another socket'
  }
}

/** Warming an image failed (the image could not be opened, or chunks could not be fetched). */
export class WarmError extends StrataError {
  override name = 'WarmError'
  override readonly code = 'ERR_WARM'
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
  }
}

/** A peer asked this node to read an image from a registry it does not read from for peers. */
export class RegistryNotAllowedError extends WarmError {
  override name = 'RegistryNotAllowedError'
  constructor(
    readonly ref: string,
    registry: string
  ) {
    super(
      `refusing to warm ${ref} for a peer: this node reads from ${registry} for peers only when configured for it ` +
        `(p2pd --registry ${registry}) or when the image was opened here first`
    )
  }
}

/** How an error travels over the control API. */
export interface ControlErrorBody {
  name: string
  code?: string
  message: string
  hint?: string
}

/** p2pd is not running, or not on that socket. */
export class ControlUnavailableError extends StrataError {
  override name = 'ControlUnavailableError'
  override readonly code = 'ERR_P2PD_UNAVAILABLE'
  override readonly hint: string
  constructor(socket: string, options?: { cause?: unknown }) {
    super(`cannot reach p2pd on ${socket}`, options)
    this.hint = 'is p2pd running? start it (systemctl start p2pd), or pass --socket PATH / set STRATA_SOCKET'
  }
}

/** An error p2pd answered with, rebuilt so it prints with its name, code and hint. */
export class ControlRemoteError extends StrataError {
  override name: string
  /** p2pd's code, or ERR_P2PD_REMOTE when its answer had none. */
  override readonly code: string
  override readonly hint: string | undefined
  constructor(body: ControlErrorBody) {
    super(body.message)
    this.name = body.name
    this.code = body.code ?? 'ERR_P2PD_REMOTE'
    this.hint = body.hint
  }
}
