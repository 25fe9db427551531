/** What every operation that can take a while accepts: a signal that gives it up. */
export interface AbortOptions {
  signal?: AbortSignal
}
