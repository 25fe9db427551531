import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { open, rename, unlink } from 'node:fs/promises'
import { basename, join } from 'node:path'
import type { AbortOptions } from '@strata/base'
import { type Caller, holdCallerDirectory, procPath, thisProcess } from './mountpoint.js'

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
  /** Whose record it is: the directory must be theirs (unless root), and the file is made theirs. */
  owner?: Caller
  /**
   * Go on from the paths the file holds (a mount served again after a p2pd restart), instead of starting
   * afresh. A file that is missing, or not a plain file, starts afresh.
   */
  resume?: boolean
}

/**
 * The file format is one path per line, what `p2pctl convert --prioritized-file` reads. Each write goes to a
 * new file of a random name, created exclusively (never through a link), in the record's directory held open
 * since the start, and is renamed over the record: a reader never sees half a list, and a path swapped for a
 * symbolic link meanwhile redirects nothing (p2pd writes records as root for other users).
 */
export async function createReadRecorder(file: string, init: ReadRecorderInit = {}): Promise<ReadRecorder> {
  const owner = init.owner ?? thisProcess()
  const dir = await holdCallerDirectory(file, owner)
  const inDir = (name: string) => join(procPath(dir.handle), name)
  const seen = new Set<string>()
  if (init.resume === true) {
    const before = await readPlain(inDir(basename(file)))
    for (const line of before?.split('\n') ?? []) if (line !== '') seen.add(line)
  }
  let written = seen.size
  let writing: Promise<void> = Promise.resolve()

  const write = async (text: string, options?: AbortOptions) => {
    const tmp = inDir(`.${basename(file)}.${randomBytes(8).toString('hex')}.tmp`)
    const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW
    const out = await open(tmp, flags, 0o644)
    try {
      await out.writeFile(text, { signal: options?.signal })
      if (owner.uid !== (process.getuid?.() ?? 0)) await out.chown(owner.uid, owner.gid)
      await out.close()
      await rename(tmp, inDir(basename(file)))
    } catch (err) {
      await out.close().catch(() => {})
      await unlink(tmp).catch(() => {})
      throw err
    }
  }

  const flush = (options?: AbortOptions): Promise<void> => {
    // A failed write does not stop the next one from trying.
    writing = writing
      .catch(() => {})
      .then(async () => {
        if (written === seen.size && written > 0) return
        const count = seen.size
        await write([...seen].map((p) => `${p}\n`).join(''), options)
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
      try {
        await flush(options)
      } finally {
        await dir.close()
      }
    }
  }
}

/** A plain file's text, opened without following a link; undefined when there is none. */
async function readPlain(path: string): Promise<string | undefined> {
  const file = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK).catch(() => undefined)
  if (file === undefined) return undefined
  try {
    if (!(await file.stat()).isFile()) return undefined
    return await file.readFile('utf8')
  } finally {
    await file.close()
  }
}
