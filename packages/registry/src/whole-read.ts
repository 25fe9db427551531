import { type ErrorSubject, ShortReadError } from './errors.js'
import type { Reply } from './http.js'

/** A run of readRuns: its index in the caller's list and its absolute [offset, end) in the blob. */
export interface Run {
  index: number
  offset: number
  end: number
}

interface Member {
  runs: Run[]
  bufs: Buffer[]
  /** Bytes of each run copied so far; -1 once delivered. */
  got: number[]
  deliver(index: number, bytes: Uint8Array): void
  onPiece: ((bytes: number) => void) | undefined
  done(err?: unknown): void
}

/**
 * A 200 that carries the whole blob, from a registry that ignores Range (quirks.ts `ignoredRange`), read once
 * for every caller whose runs it has not passed yet: a call of readRuns on the same blob while it streams joins
 * it instead of asking for the whole blob again. Runs are delivered as the stream passes their end; the body is
 * given up once no member waits for anything more (nobody left, or every run delivered). Its request has its
 * own signal (`abort`), aborted once every member has gone: one caller's abort does not end the others' read.
 */
export class WholeRead {
  /** Bytes of the body read so far: a run starting before this cannot join. */
  pos = 0
  closed = false
  private readonly members = new Set<Member>()
  private started = false

  constructor(
    private readonly reply: Reply,
    private readonly subject: ErrorSubject,
    private readonly abort: (reason: unknown) => void
  ) {}

  /** Whether runs starting at `offset` can still be served from this read. */
  accepts(offset: number): boolean {
    return !this.closed && offset >= this.pos
  }

  /** Serves `runs` (sorted, each at or past `pos`) from this read; settles once they are all delivered. */
  join(
    runs: Run[],
    deliver: (index: number, bytes: Uint8Array) => void,
    options: { signal?: AbortSignal | undefined; onProgress?(bytes: number): void }
  ): Promise<void> {
    const signal = options.signal
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        this.leave(member)
        reject(signal?.reason)
      }
      const member: Member = {
        runs,
        bufs: runs.map((r) => Buffer.alloc(r.end - r.offset)),
        got: runs.map(() => 0),
        deliver,
        onPiece: options.onProgress,
        done: (err) => {
          signal?.removeEventListener('abort', onAbort)
          if (err === undefined) resolve()
          else reject(err)
        }
      }
      if (signal?.aborted === true) return reject(signal.reason)
      signal?.addEventListener('abort', onAbort, { once: true })
      this.members.add(member)
      if (!this.started) {
        this.started = true
        void this.pump()
      }
    })
  }

  private leave(member: Member): void {
    this.members.delete(member)
    if (this.members.size === 0 && !this.closed) {
      this.closed = true
      this.abort(new Error('nobody waits for this read'))
    }
  }

  private async pump(): Promise<void> {
    try {
      for await (const c of this.reply.chunks((n) => {
        for (const m of this.members) m.onPiece?.(n)
      })) {
        const pos = this.pos
        this.pos += c.length
        for (const m of [...this.members]) {
          let left = 0
          for (const [i, r] of m.runs.entries()) {
            if (m.got[i] === -1) continue
            const from = Math.max(0, r.offset - pos)
            const to = Math.min(c.length, r.end - pos)
            if (to > from) {
              m.bufs[i]!.set(c.subarray(from, to), pos + from - r.offset)
              m.got[i]! += to - from
            }
            if (m.got[i] === r.end - r.offset) {
              m.got[i] = -1
              m.deliver(r.index, m.bufs[i]!)
            } else left++
          }
          if (left === 0) {
            this.members.delete(m)
            m.done()
          }
        }
        if (this.members.size === 0) {
          this.closed = true
          return
        }
      }
      this.closed = true
      const total = Number(this.reply.header('content-length') ?? this.pos)
      if (this.pos < total) throw new ShortReadError(`the body ended after ${this.pos} of ${total} bytes`, this.subject)
      // Runs past the end of the blob come back short.
      for (const m of this.members) {
        for (const [i, r] of m.runs.entries()) if (m.got[i] !== -1) m.deliver(r.index, m.bufs[i]!.subarray(0, m.got[i]))
        m.done()
      }
      this.members.clear()
    } catch (err) {
      this.closed = true
      for (const m of this.members) m.done(err)
      this.members.clear()
    }
  }
}
