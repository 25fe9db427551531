import { rename, writeFile } from 'node:fs/promises'
import type { AbortOptions } from '@strata/stargz'

/** Records which files a workload reads, in the order of their first read. */
export interface ReadRecorder {
  /** Notes a read of `path` (FUSE style `/a/b` or `a/b`); only the first read of a path counts. */
  record(path: string): void
  /** The paths so far, in first-read order, without a leading `/`. */
  paths(): string[]
  /** Writes the file now (only when something changed). */
  flush(options?: AbortOptions): Promise<void>
  /** Stops the periodic flush and writes the file a last time. */
  close(options?: AbortOptions): Promise<void>
}

export interface ReadRecorderInit {
  /** How often the file is rewritten while the mount runs (default 5 s); 0 turns it off. */
  flushIntervalMs?: number
}

/**
 * The file format is one path per line, what `p2pctl convert --prioritized-file` reads. It is written to
 * a temporary name and renamed, so a reader never sees half a list.
 */
export function createReadRecorder(file: string, init: ReadRecorderInit = {}): ReadRecorder {
  const seen = new Set<string>()
  let written = 0
  let writing: Promise<void> = Promise.resolve()

  const flush = (options?: AbortOptions): Promise<void> => {
    // A failed write does not stop the next one from trying.
    writing = writing
      .catch(() => {})
      .then(async () => {
        if (written === seen.size && written > 0) return
        const count = seen.size
        const text = [...seen].map((p) => `${p}\n`).join('')
        const tmp = `${file}.${process.pid}.tmp`
        await writeFile(tmp, text, { signal: options?.signal })
        await rename(tmp, file)
        written = count
      })
    return writing
  }

  const interval = init.flushIntervalMs ?? 5000
  const timer = interval > 0 ? setInterval(() => void flush().catch(() => {}), interval) : undefined
  timer?.unref()

  return {
    record(path) {
      seen.add(path.startsWith('/') ? path.slice(1) : path)
    },
    paths: () => [...seen],
    flush,
    async close(options) {
      clearInterval(timer)
      await flush(options)
    }
  }
}
