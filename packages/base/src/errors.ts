/**
 * The one error template: every error strata throws on purpose is a StrataError with a stable `name` (its class
 * name, ending in `Error`), a stable `code` and, where the operator can act, a `hint` saying what to do. Match
 * errors by `name` or `code`, never by `instanceof`: a package may be loaded twice.
 *
 * A subclass sets `name` and `code` as fields (`override readonly name = 'StoreFullError'`) and passes its hint
 * to the constructor, or declares it as a field when it is fixed.
 */
export interface StrataErrorOptions {
  cause?: unknown
  /** What the operator can do about it. */
  hint?: string | undefined
}

export class StrataError extends Error {
  override readonly name: string = 'StrataError'
  readonly code: string = 'ERR_STRATA'
  readonly hint?: string | undefined

  constructor(message: string, options: StrataErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    if (options.hint !== undefined) this.hint = options.hint
  }
}
