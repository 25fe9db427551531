/** Small async helpers of the peer source. */

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted === true) return reject(signal.reason)
    const onAbort = () => {
      clearTimeout(timer)
      reject(signal!.reason)
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** Yields from all sources as each produces. */
export async function* merge<T>(sources: AsyncIterable<T>[]): AsyncGenerator<T> {
  const iterators = sources.map((s) => s[Symbol.asyncIterator]())
  const next = (i: number) => iterators[i]!.next().then((result) => ({ i, result }))
  const pending = new Map(iterators.map((_, i) => [i, next(i)]))
  try {
    while (pending.size > 0) {
      const { i, result } = await Promise.race(pending.values())
      if (result.done === true) {
        pending.delete(i)
        continue
      }
      pending.set(i, next(i))
      yield result.value
    }
  } finally {
    await Promise.all(iterators.map((it) => it.return?.()))
  }
}
