import { createHash, randomBytes } from 'node:crypto'
import { open, rename, rm } from 'node:fs/promises'
import type { AbortOptions } from '@strata/base'
import type { ReadAt } from '@strata/stargz'
import {
  BlobUnknownError,
  DigestMismatchError,
  type ErrorSubject,
  RangeNotSatisfiableError,
  RETRYABLE,
  ShortReadError,
  UnexpectedResponseError,
  UnsupportedMediaTypeError
} from './errors.js'
import type { HttpCore, Reply } from './http.js'
import { withDeadline } from './http.js'
import type { Descriptor } from './manifest.js'
import { ignoredRange } from './quirks.js'
import type { Reference } from './reference.js'
import { type Run, WholeRead } from './whole-read.js'

// Blob reads: ranges (readAt, and readRuns, the one primitive the fetcher's registry source reads chunks with),
// whole blobs (fetchBlob, downloadBlob) and sizes (blobSize, blobExists).

export interface Range {
  offset: number
  length: number
}

export type ReadOptions = AbortOptions & { onProgress?(bytes: number): void }

export interface BlobOptions {
  /** Each read of the blob must end within the client's deadlineMs (true) or this many ms: for small reads. */
  deadline?: boolean | number
  /** What the reads are of, for the deadline's error (default `a range of the blob`), e.g. `the TOC`. */
  what?: string
}

/** A remote blob read with HTTP Range requests. `size` is NaN until known (pass it, or after a first read). */
export interface RemoteBlob extends ReadAt {
  /** As ReadAt; `onProgress` hears the length of each piece of the body as it arrives (a slow read is moving). */
  readAt(offset: number, length: number, options?: ReadOptions): Promise<Uint8Array>
  /**
   * Reads `runs` of the blob, calling `onRun(index, bytes)` as each arrives (in blob order). A registry that honours
   * Range gets a Range request per run (the caller coalesces: runs are what it wants read together). One that
   * ignores Range (see quirks.ts `ignoredRange`) answers the first with the whole blob: then that one response
   * serves every run, sliced as the stream passes it, and the registry is remembered, so that a later call is one
   * whole read for all its runs too, and a call made while such a read streams joins it for the runs it has not
   * passed yet (see whole-read.ts). Bytes past the end of the blob are not returned (a run may come back short).
   */
  readRuns(runs: Range[], onRun: (index: number, bytes: Uint8Array) => void, options?: ReadOptions): Promise<void>
  /** True once the blob's registry was seen answering a Range request with the whole blob. */
  readonly ignoresRange: boolean
  /** Whether a readRuns call for runs from `offset` on would now join a whole-blob read in flight. */
  joins(offset: number): boolean
}

/** What a RemoteBlob learns as it is read: its size, and the whole-blob read in flight, if any. */
interface Known {
  size: number
  whole?: WholeRead
}

export function hashFor(digest: string) {
  const algo = digest.slice(0, digest.indexOf(':'))
  if (algo !== 'sha256' && algo !== 'sha512') {
    throw new UnsupportedMediaTypeError(`unsupported digest algorithm '${algo}' in ${digest}`)
  }
  return { algo, hash: createHash(algo) }
}

export function digestOf(bytes: Uint8Array, like: string): string {
  const { algo, hash } = hashFor(like)
  return `${algo}:${hash.update(bytes).digest('hex')}`
}

export class Blobs {
  /** Registries seen answering a Range request with the whole blob. */
  private readonly rangeRefused = new Set<string>()

  constructor(
    private readonly http: HttpCore,
    private readonly deadlineMs: number
  ) {}

  blob(ref: Reference, d: string | Descriptor, size?: number, blobOptions: BlobOptions = {}): RemoteBlob {
    const digest = typeof d === 'string' ? d : d.digest
    const known: Known = { size: size ?? (typeof d === 'string' ? Number.NaN : d.size) }
    const { deadline, what = 'a range of the blob' } = blobOptions
    const ms = deadline === true ? this.deadlineMs : typeof deadline === 'number' ? deadline : 0
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const readRuns = (runs: Range[], onRun: (index: number, bytes: Uint8Array) => void, options: ReadOptions = {}) => {
      if (ms === 0) return this.readRuns(ref, digest, known, runs, onRun, options)
      const offset = Math.min(...runs.map((r) => r.offset))
      const length = Math.max(...runs.map((r) => r.offset + r.length)) - offset
      return withDeadline(
        ms,
        `reading ${what} (${length} bytes at offset ${offset})`,
        subject,
        options.signal,
        (signal) => this.readRuns(ref, digest, known, runs, onRun, { ...options, signal })
      )
    }
    const refused = this.rangeRefused
    return {
      get size() {
        return known.size
      },
      get ignoresRange() {
        return refused.has(ref.registry)
      },
      joins: (offset: number) => known.whole?.accepts(offset) === true,
      async readAt(offset: number, length: number, options?: ReadOptions) {
        let got: Uint8Array = new Uint8Array(0)
        await readRuns(
          [{ offset, length }],
          (_, bytes) => {
            got = bytes
          },
          options
        )
        return got
      },
      readRuns
    }
  }

  private async readRuns(
    ref: Reference,
    digest: string,
    known: Known,
    ranges: Range[],
    onRun: (index: number, bytes: Uint8Array) => void,
    options: ReadOptions
  ): Promise<void> {
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const runs: Run[] = []
    for (const [index, { offset, length }] of ranges.entries()) {
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
        throw new RangeNotSatisfiableError(`invalid range offset ${offset} length ${length}`, subject)
      }
      const n = Number.isNaN(known.size) ? length : Math.max(0, Math.min(length, known.size - offset))
      if (n === 0) onRun(index, new Uint8Array(0))
      else runs.push({ index, offset, end: offset + n })
    }
    runs.sort((a, b) => a.offset - b.offset)
    const left = new Set(runs.map((r) => r.index))
    const deliver = (index: number, bytes: Uint8Array) => {
      if (left.delete(index)) onRun(index, bytes)
    }
    const pending = () => runs.filter((r) => left.has(r.index))
    // Unless the registry is known to ignore Range, the first run goes alone: a 200 to it serves every run.
    // Then the others, each by its own Range request, one after the other: the caller reads in parallel.
    // Runs a whole read of this blob in flight has not passed yet join it (once: if it fails, they ask anew).
    let joined = false
    while (left.size > 0) {
      const todo = pending()
      const whole = known.whole
      if (!joined && whole !== undefined && whole.accepts(todo[0]!.offset)) {
        joined = true
        try {
          await whole.join(todo, deliver, options)
        } catch (err) {
          if (!RETRYABLE.has((err as Error)?.name) || options.signal?.aborted === true) throw err
        }
        continue
      }
      const span = this.rangeRefused.has(ref.registry)
        ? { offset: todo[0]!.offset, end: Math.max(...todo.map((r) => r.end)) }
        : todo[0]!
      await this.http.withRetry(options.signal, () =>
        this.readSpan(ref, digest, known, span, pending(), deliver, options)
      )
    }
  }

  /**
   * One GET of [span.offset, span.end) that delivers the runs it covers: from a 206 of the span, or, when the
   * registry ignores Range, from the whole blob's stream, every run of `runs`, stopping once the last has passed.
   */
  private async readSpan(
    ref: Reference,
    digest: string,
    known: Known,
    span: { offset: number; end: number },
    runs: Run[],
    deliver: (index: number, bytes: Uint8Array) => void,
    options: ReadOptions
  ): Promise<void> {
    if (runs.length === 0) return
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    const range = `bytes=${span.offset}-${span.end - 1}`
    // The request's own signal: a whole-blob answer may be shared with later callers (see WholeRead).
    const request = new AbortController()
    const signal = options.signal
    const forward = () => request.abort(signal?.reason)
    if (signal?.aborted === true) forward()
    signal?.addEventListener('abort', forward, { once: true })
    let reply: Reply
    try {
      reply = await this.getBlob(ref, digest, subject, [200, 206], request.signal, { range })
    } finally {
      signal?.removeEventListener('abort', forward)
    }
    if (ignoredRange(reply.res.status)) {
      this.rangeRefused.add(ref.registry)
      const total = Number(reply.header('content-length') ?? Number.NaN)
      if (!Number.isNaN(total)) known.size = total
      const whole = new WholeRead(reply, subject, (reason) => request.abort(reason))
      known.whole = whole
      return whole.join(runs, deliver, options)
    }
    signal?.addEventListener('abort', forward, { once: true })
    try {
      return await this.rangeAnswer(reply, known, span, runs, deliver, options)
    } finally {
      signal?.removeEventListener('abort', forward)
    }
  }

  /** The runs `span` covers, from a 206 of it. */
  private async rangeAnswer(
    reply: Reply,
    known: Known,
    span: { offset: number; end: number },
    runs: Run[],
    deliver: (index: number, bytes: Uint8Array) => void,
    options: ReadOptions
  ): Promise<void> {
    const subject = reply.subject
    const { offset } = span
    const length = span.end - span.offset
    const range = `bytes=${offset}-${span.end - 1}`
    const cr = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(reply.header('content-range') ?? '')
    if (cr === null || Number(cr[1]) !== offset) {
      await reply.discard()
      throw new UnexpectedResponseError(
        `206 with Content-Range '${reply.header('content-range')}' for ${range}`,
        subject
      )
    }
    if (cr[3] !== '*') known.size = Number(cr[3])
    const want = Number(cr[2]) - offset + 1
    if (want > length) {
      await reply.discard()
      throw new UnexpectedResponseError(
        `206 with more bytes than asked (${reply.header('content-range')} for ${range})`,
        subject
      )
    }
    const bytes = await reply.bytes(want, undefined, options.onProgress)
    if (bytes.length !== want) {
      throw new ShortReadError(`range ${range} returned ${bytes.length} of ${want} bytes`, subject)
    }
    if (want < length && !(Number.isFinite(known.size) && offset + want >= known.size)) {
      throw new ShortReadError(`range ${range} returned only ${want} bytes before the end of the blob`, subject)
    }
    for (const r of runs) {
      if (r.offset >= offset && r.end <= span.end) deliver(r.index, bytes.subarray(r.offset - offset, r.end - offset))
    }
  }

  /** A small blob (a config) read whole and digest-checked, within the deadline. */
  async fetchBlob(ref: Reference, digest: string, options: AbortOptions & { maxBytes?: number }): Promise<Uint8Array> {
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    return withDeadline(this.deadlineMs, 'reading the blob (a config, read whole)', subject, options.signal, (signal) =>
      this.http.withRetry(signal, async () => {
        const reply = await this.getBlob(ref, digest, subject, [200], signal)
        const bytes = await reply.bytes(options.maxBytes ?? 64 * 1024 * 1024)
        const got = digestOf(bytes, digest)
        if (got !== digest) {
          throw new DigestMismatchError(`blob content has digest ${got}`, {
            ...subject,
            hint: 'the registry served corrupt data'
          })
        }
        return bytes
      })
    )
  }

  /** Streams a blob to `path` via a temp file, renamed once the digest checks. */
  async downloadBlob(
    ref: Reference,
    digest: string,
    path: string,
    options: AbortOptions & { onProgress?(bytes: number): void }
  ): Promise<void> {
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    await this.http.withRetry(options.signal, async () => {
      const reply = await this.getBlob(ref, digest, subject, [200], options.signal)
      const temp = `${path}.${randomBytes(6).toString('hex')}.partial`
      const file = await open(temp, 'wx')
      try {
        const { algo, hash } = hashFor(digest)
        let n = 0
        for await (const chunk of reply.chunks()) {
          hash.update(chunk)
          await file.write(chunk)
          n += chunk.length
          options.onProgress?.(n)
        }
        const declared = reply.header('content-length')
        if (declared !== null && Number(declared) !== n)
          throw new ShortReadError(`the body ended after ${n} of ${declared} bytes`, subject)
        const got = `${algo}:${hash.digest('hex')}`
        if (got !== digest) {
          throw new DigestMismatchError(`downloaded content has digest ${got}`, {
            ...subject,
            hint: 'the registry served corrupt data'
          })
        }
        await file.sync()
        await file.close()
        await rename(temp, path)
      } catch (err) {
        await file.close().catch(() => {})
        await rm(temp, { force: true })
        throw err
      }
    })
  }

  async blobExists(ref: Reference, digest: string, options: AbortOptions): Promise<boolean> {
    try {
      await this.blobSize(ref, digest, options)
      return true
    } catch (err) {
      if ((err as Error).name === BlobUnknownError.name) return false
      throw err
    }
  }

  async blobSize(ref: Reference, digest: string, options: AbortOptions): Promise<number> {
    const subject = { registry: ref.registry, repository: ref.repository, digest }
    return this.http.withRetry(options.signal, async () => {
      const reply = await this.http.request(
        { ref, method: 'HEAD', path: `blobs/${digest}`, subject, signal: options.signal },
        [200]
      )
      await reply.discard()
      const n = Number(reply.header('content-length'))
      if (!Number.isSafeInteger(n)) throw new UnexpectedResponseError('HEAD of the blob has no Content-Length', subject)
      return n
    })
  }

  /** GET of a blob (whole, or the range in `headers`), remembering where its storage redirect goes. */
  private getBlob(
    ref: Reference,
    digest: string,
    subject: ErrorSubject,
    ok: number[],
    signal: AbortSignal | undefined,
    headers?: Record<string, string>
  ): Promise<Reply> {
    const blobKey = `${ref.registry}/${ref.repository}@${digest}`
    return this.http.request(
      { ref, method: 'GET', path: `blobs/${digest}`, ...(headers ? { headers } : {}), subject, blobKey, signal },
      ok
    )
  }
}
