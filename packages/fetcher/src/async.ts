/** Small async helpers of the read path: racing a signal, bounded concurrency, an abortable sleep. */

export function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err)
}

/**
 * Resolves/rejects with `p`, or rejects as soon as `signal` aborts (the work behind `p` goes on for others).
 * `p`'s own failure is always handled, even when `signal` had aborted before.
 */
export function raceSignal<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return p
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason)
    if (signal.aborted) onAbort()
    else signal.addEventListener('abort', onAbort, { once: true })
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort)
        resolve(v)
      },
      (e) => {
        signal.removeEventListener('abort', onAbort)
        reject(e)
      }
    )
  })
}

/**
 * The items of `items` until `signal` aborts, then rejects at once, even while the source is stuck in an await
 * (one that ignores its signal is left behind, told to return so it can clean up when it wakes).
 */
export async function* untilAborted<T>(items: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T> {
  const it = items[Symbol.asyncIterator]()
  let ended = false
  try {
    for (;;) {
      const r = await raceSignal(it.next(), signal)
      if (r.done) {
        ended = true
        return
      }
      yield r.value
    }
  } finally {
    if (!ended) it.return?.().catch(() => {})
  }
}

/** Runs `fn` over `items` with at most `limit` at once; rejects with the first error. */
export async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length)
  let next = 0
  const worker = async () => {
    while (next < items.length) {
      const i = next++
      out[i] = await fn(items[i]!, i)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  return out
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms)
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t)
        reject(signal.reason)
      },
      { once: true }
    )
  })
}
