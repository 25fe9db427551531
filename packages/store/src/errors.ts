import { StrataError } from '@strata/base'

/** The store's failure modes: one class each, matched by `name` (or `code`), never by instanceof. */

/** Another process (or another open in this one) owns the store directory. */
export class StoreLockedError extends StrataError {
  override readonly name = 'StoreLockedError'
  override readonly code = 'STORE_LOCKED'
  override readonly hint: string
  readonly dir: string

  constructor(dir: string, options?: ErrorOptions) {
    super(`the store at ${dir} is in use by another process (p2pd?)`, options)
    this.dir = dir
    this.hint =
      'only one process may own a store: stop the other process, or let p2p-mount talk to the running p2pd, ' +
      'or point this one at another store directory'
  }
}

/**
 * The file system holding the store ran out of space (ENOSPC, EDQUOT), or would leave the store's index too
 * little room to write and to open again (see DiskStoreInit.headroomBytes): while storing a chunk (`digest`), or
 * when opening the store (no `digest`).
 */
export class StoreFullError extends StrataError {
  override readonly name = 'StoreFullError'
  override readonly code = 'STORE_FULL'
  override readonly hint: string
  readonly dir: string
  readonly digest: string | undefined
  /** Bytes free on the file system when it was found full, when known. */
  readonly free: number | undefined

  constructor(dir: string, digest: string | undefined, options?: ErrorOptions & { free?: number }) {
    const free = options?.free === undefined ? '' : ` (${options.free} bytes free)`
    super(
      digest !== undefined
        ? `cannot store chunk ${digest}: the disk holding the store at ${dir} is full${free}`
        : `cannot open the store at ${dir}: the disk holding it is full${free}, and its index needs room to open`,
      options
    )
    this.dir = dir
    this.digest = digest
    this.free = options?.free
    this.hint =
      digest !== undefined
        ? `free space on the file system of ${dir}, or set a size cap (maxBytes) below its free space`
        : `free space on the file system of ${dir} (a few MiB will do: the store then evicts unpinned chunks until it has room again), or remove ${dir} to start with an empty cache`
  }
}

/** A chunk cannot fit under the size cap: pinned chunks take the room, or the chunk is larger than the cap. */
export class StoreCapError extends StrataError {
  override readonly name = 'StoreCapError'
  override readonly code = 'STORE_CAP_EXCEEDED'
  override readonly hint: string
  readonly digest: string

  constructor(digest: string, size: number, maxBytes: number, pinnedBytes: number) {
    const why = size > maxBytes ? 'the chunk alone is larger' : `${pinnedBytes} bytes are pinned`
    super(`cannot store chunk ${digest} (${size} bytes) under the store's cap of ${maxBytes} bytes: ${why}`)
    this.digest = digest
    this.hint = 'raise the store size cap (maxBytes), or unpin images that are no longer mounted'
  }
}

/** A digest that is not `sha256:` and 64 lowercase hex digits. */
export class InvalidDigestError extends StrataError {
  override readonly name = 'InvalidDigestError'
  override readonly code = 'STORE_INVALID_DIGEST'

  constructor(digest: string) {
    super(`not a chunk digest (want sha256:<64 lowercase hex>): ${JSON.stringify(digest.slice(0, 100))}`)
  }
}

/** The store was used after close(). */
export class StoreClosedError extends StrataError {
  override readonly name = 'StoreClosedError'
  override readonly code = 'STORE_CLOSED'

  constructor(what: string) {
    super(`the store ${what} is closed`)
  }
}

/** A file operation of the disk store failed for a reason other than a full disk. */
export class StoreIOError extends StrataError {
  override readonly name = 'StoreIOError'
  override readonly code = 'STORE_IO'
  override readonly hint: string
  readonly path: string

  constructor(operation: string, path: string, options: ErrorOptions) {
    // The innermost cause says what the OS or LevelDB saw (e.g. "EACCES: permission denied, open ...").
    let inner = options.cause
    while (inner instanceof Error && inner.cause instanceof Error) inner = inner.cause
    super(`store ${operation} failed on ${path}: ${inner instanceof Error ? inner.message : String(inner)}`, options)
    this.path = path
    this.hint = `check that ${path} is readable and writable by this user and that its file system is healthy`
  }
}
