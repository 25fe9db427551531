// The builder's first pass: the input spooled to a temporary file (inflated when gzipped, its entries checked),
// the entries put in the reference's order, and the spool file read back for the second pass (builder.ts).
import { createWriteStream } from 'node:fs'
import type { FileHandle } from 'node:fs/promises'
import { posix } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { createGunzip } from 'node:zlib'
import {
  BuildSpoolError,
  InputDecompressError,
  PrioritizedFileNotFoundError,
  UnsafeTarEntryError,
  UnsupportedTarEntryError
} from './build-errors.js'
import { normaliseEntryName } from './names.js'
import { regularFileHeader, type TarHeader, TarParser } from './tar.js'
import type { EntryType } from './types.js'

const PREFETCH_LANDMARK = '.prefetch.landmark'
const NO_PREFETCH_LANDMARK = '.no.prefetch.landmark'
const LANDMARK_CONTENT = Buffer.from([0x0f])
export const TYPES: Record<string, EntryType> = {
  '0': 'reg',
  '1': 'hardlink',
  '2': 'symlink',
  '3': 'char',
  '4': 'block',
  '5': 'dir',
  '6': 'fifo'
}

export type Input = AsyncIterable<Uint8Array> | NodeJS.ReadableStream

/** `path.Clean("/" + name)` without the leading slash: the key the reference matches entries by. */
export function cleanEntryName(name: string): string {
  const p = posix.normalize(`/${name}`)
  return p === '/' ? '' : p.replace(/\/+$/, '').slice(1)
}

/** Streams the input (inflating it when gzipped) to `path` and returns its tar headers in order. */
export async function spool(input: Input, path: string, signal?: AbortSignal): Promise<TarHeader[]> {
  const parser = new TarParser()
  const headers: TarHeader[] = []
  const index = async function* (chunks: AsyncIterable<Uint8Array>) {
    for await (const chunk of chunks) {
      for (const h of parser.push(chunk)) {
        checkSupported(h)
        checkNames(h)
        headers.push(h)
      }
      yield chunk
    }
    parser.end()
  }
  const file = createWriteStream(path)
  let fileError: unknown
  file.once('error', (err) => {
    fileError = err
  })
  try {
    await pipeline(inflateIfGzip(input as AsyncIterable<Uint8Array>), index, file, { signal })
  } catch (err) {
    if (err === fileError) {
      throw new BuildSpoolError(`cannot write the build's spool file ${path}: ${(err as Error).message}`, {
        cause: err,
        hint: 'free space in the temporary directory (it needs the uncompressed size of the layer), or point TMPDIR elsewhere'
      })
    }
    throw err
  }
  return headers
}

function checkSupported(h: TarHeader): void {
  if (TYPES[h.typeflag] === undefined) {
    const what =
      h.typeflag === 'g'
        ? 'global PAX headers are not supported'
        : h.typeflag === 'S'
          ? 'sparse files are not supported'
          : `unsupported entry type ${JSON.stringify(h.typeflag)}`
    throw new UnsupportedTarEntryError(what, h.name, h.offset)
  }
  for (const key of h.pax.keys()) {
    if (key.startsWith('GNU.sparse.'))
      throw new UnsupportedTarEntryError('sparse files are not supported', h.name, h.offset)
  }
}

/**
 * Refuses a name or hardlink target that strata's TOC parser would refuse (the one rule of names.ts), before
 * anything is built: such a layer could not be mounted, and other tools might write outside their root.
 */
function checkNames(h: TarHeader): void {
  const name = normaliseEntryName(h.name)
  if (typeof name !== 'string') throw new UnsafeTarEntryError(name.refused, h.name, h.offset)
  if (h.typeflag !== '1') return
  const target = normaliseEntryName(h.linkname, 'hardlink target')
  if (typeof target !== 'string') throw new UnsafeTarEntryError(target.refused, h.name, h.offset)
}

/** The input as tar bytes: inflated when it starts with the gzip magic. */
async function* inflateIfGzip(input: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  const it = input[Symbol.asyncIterator]()
  const head: Uint8Array[] = []
  let headLen = 0
  let done = false
  while (headLen < 3) {
    const r = await it.next()
    if (r.done === true) {
      done = true
      break
    }
    head.push(r.value)
    headLen += r.value.length
  }
  const all = (async function* () {
    try {
      yield* head
      while (!done) {
        const r = await it.next()
        done = r.done === true
        if (!done) yield r.value
      }
    } finally {
      if (!done) await it.return?.()
    }
  })()
  const first = Buffer.concat(head)
  if (first[0] !== 0x1f || first[1] !== 0x8b || first[2] !== 0x08) {
    yield* all
    return
  }
  const gunzip = createGunzip()
  const feeding = pipeline(all, gunzip)
  feeding.catch(() => {})
  try {
    yield* gunzip
    await feeding
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code?.startsWith('Z_') === true) {
      throw new InputDecompressError(`gzipped input does not inflate: ${(err as Error).message}`, {
        cause: err,
        hint: 'the input .tar.gz is corrupted or truncated: fetch or create it again'
      })
    }
    throw err
  }
}

/** What the blob holds, in order: an input entry, or a landmark file made here. */
export type Item = { header: TarHeader; raw?: Buffer; content?: Buffer }

/**
 * The reference's order (estargz sortEntries): with prioritized files, each of them after its parent
 * directories and hardlink target, then `.prefetch.landmark`, then the rest; without, `.no.prefetch.landmark`
 * first. A later entry with the same path replaces an earlier one; landmarks in the input are dropped.
 * Parent directories that the tar does not list are skipped (the reference refuses those files).
 */
export function orderEntries(headers: TarHeader[], prioritized: string[]): Item[] {
  const byName = new Map<string, number>()
  const live: (TarHeader | undefined)[] = []
  for (const h of headers) {
    const name = cleanEntryName(h.name)
    if (name === PREFETCH_LANDMARK || name === NO_PREFETCH_LANDMARK) continue
    const prev = byName.get(name)
    if (prev !== undefined) live[prev] = undefined
    byName.set(name, live.length)
    live.push(h)
  }
  const first: Item[] = []
  const visiting = new Set<number>()
  const move = (name: string, required: boolean): void => {
    const clean = cleanEntryName(name)
    const i = byName.get(clean)
    if (i === undefined) {
      if (required && clean !== '') throw new PrioritizedFileNotFoundError(name)
      return
    }
    if (visiting.has(i)) return // a hardlink cycle in a hostile tar
    visiting.add(i)
    if (clean !== '') {
      const parent = posix.dirname(clean)
      move(parent === '.' ? '' : parent, false)
      const h = live[i]
      if (h !== undefined && h.typeflag === '1') move(h.linkname, true)
    }
    const h = live[i]
    if (h !== undefined) first.push({ header: h })
    live[i] = undefined
  }
  for (const p of prioritized) move(p, true)
  const landmark = landmarkItem(prioritized.length > 0 ? PREFETCH_LANDMARK : NO_PREFETCH_LANDMARK)
  const rest = live.filter((h): h is TarHeader => h !== undefined).map((header) => ({ header }))
  return [...first, landmark, ...rest]
}

function landmarkItem(name: string): Item {
  return {
    header: {
      name,
      typeflag: '0',
      mode: 0,
      uid: 0,
      gid: 0,
      size: 1,
      mtimeSec: 0,
      mtimeNsec: 0,
      linkname: '',
      uname: '',
      gname: '',
      devmajor: 0,
      devminor: 0,
      pax: new Map(),
      offset: -1,
      dataOffset: -1,
      dataSize: 1
    },
    raw: regularFileHeader(name, 1),
    content: LANDMARK_CONTENT
  }
}

/** Reads the spool file: large ranges directly, small ones through a read-ahead window. */
export class SpoolReader {
  private window: Buffer = Buffer.alloc(0)
  private windowStart = 0
  private static readonly WINDOW = 1 << 20

  constructor(
    private readonly handle: FileHandle,
    private readonly path: string
  ) {}

  /** A copy of [pos, pos + length) that the caller owns. */
  async read(pos: number, length: number): Promise<Buffer> {
    if (length > SpoolReader.WINDOW / 2) return this.readFile(pos, length)
    if (pos < this.windowStart || pos + length > this.windowStart + this.window.length) {
      this.window = await this.readFile(pos, SpoolReader.WINDOW, true)
      this.windowStart = pos
    }
    const at = pos - this.windowStart
    return Buffer.from(this.window.subarray(at, at + length))
  }

  private async readFile(pos: number, length: number, partial = false): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length)
    let done = 0
    try {
      while (done < length) {
        const { bytesRead } = await this.handle.read(buf, done, length - done, pos + done)
        if (bytesRead === 0) break
        done += bytesRead
      }
    } catch (err) {
      throw new BuildSpoolError(`cannot read the build's spool file ${this.path}: ${(err as Error).message}`, {
        cause: err
      })
    }
    if (done < length && !partial) {
      throw new BuildSpoolError(`the build's spool file ${this.path} is shorter than expected (modified meanwhile?)`)
    }
    return done < length ? buf.subarray(0, done) : buf
  }
}
