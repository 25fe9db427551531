import { type FileHandle, open, readFile, rename, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { OpenLog } from './fuse-responder.js'

/**
 * The open log of a session served directly (fuse.ts OpenLog), a file in the holder's directory: `+NODE ID`
 * (ID -1: opened without passthrough) and `-NODE` lines, appended. The next process reads it, keeps the nodes
 * still open as they are, and writes it anew with those only.
 */
export class FileOpenLog implements OpenLog {
  readonly path: string
  #fh: Promise<FileHandle> | undefined
  /** What the log says is open now, and how many lines it has: it is written anew when mostly stale. */
  readonly #open: Map<number, number | undefined>
  #lines: number
  /** Writes one at a time, in order (a rewrite must not lose a line written meanwhile). */
  #tail: Promise<void> = Promise.resolve()

  constructor(path: string, open = new Map<number, number | undefined>()) {
    this.path = path
    this.#open = open
    this.#lines = open.size
  }

  /** What the last process left open, the log then written anew with it. */
  static async take(path: string): Promise<{ log: FileOpenLog; open: Map<number, number | undefined> }> {
    const open = new Map<number, number | undefined>()
    const text = await readFile(path, 'utf8').catch(() => '')
    for (const line of text.split('\n')) {
      const m = /^([+-])(\d+)(?: (-?\d+))?$/.exec(line)
      if (m === null) continue
      const node = Number(m[2])
      if (m[1] === '-') open.delete(node)
      else open.set(node, Number(m[3]) >= 0 ? Number(m[3]) : undefined)
    }
    const log = new FileOpenLog(path, new Map(open))
    await log.#rewrite()
    return { log, open }
  }

  async #rewrite(): Promise<void> {
    const fresh = [...this.#open].map(([node, id]) => `+${node} ${id ?? -1}\n`).join('')
    await writeFile(`${this.path}.tmp`, fresh, { mode: 0o600 })
    await rename(`${this.path}.tmp`, this.path)
    const fh = this.#fh
    this.#fh = undefined
    await fh?.then((f) => f.close()).catch(() => {})
    this.#lines = this.#open.size
  }

  #append(line: string): Promise<void> {
    const next = this.#tail.then(async () => {
      this.#fh ??= open(this.path, 'a', 0o600)
      await (await this.#fh).write(line)
      if (++this.#lines > 1024 && this.#lines > 4 * this.#open.size) await this.#rewrite()
    })
    this.#tail = next.catch(() => {})
    return next
  }

  opened(nodeid: number, backingId: number | undefined): Promise<void> {
    this.#open.set(nodeid, backingId)
    return this.#append(`+${nodeid} ${backingId ?? -1}\n`)
  }

  released(nodeid: number): Promise<void> {
    this.#open.delete(nodeid)
    return this.#append(`-${nodeid}\n`)
  }

  async close(remove = false): Promise<void> {
    await this.#tail
    const fh = this.#fh
    this.#fh = undefined
    await fh?.then((f) => f.close()).catch(() => {})
    if (remove) await unlink(this.path).catch(() => {})
  }
}

/** Where the open log of session `id` of the holder `holderPid` is kept. */
export function openLogPath(dir: string, holderPid: number, id: string): string {
  return join(dir, `opens-${holderPid}-${id}.log`)
}
