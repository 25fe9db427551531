import { mkdtemp, open, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { gzip } from 'node:zlib'
import { digestHasher, sha256Digest, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION } from '@strata/base'
import { cleanEntryName, type Input, type Item, orderEntries, SpoolReader, spool, TYPES } from './build-spool.js'
import { regularFileHeader, TAR_TRAILER, tarPadding } from './tar.js'
import { encodeTOC, formatModtime } from './tocjson.js'
import type { TOCEntryJSON } from './types.js'

export interface BuildOptions {
  /** Largest chunk of a file's content in one gzip member (default 4 MiB, as the reference). */
  chunkSize?: number
  /** Paths to put first, with their parent directories and hardlink targets, before `.prefetch.landmark`. */
  prioritizedFiles?: string[]
  /** gzip level 0-9 (default 9, the reference's gzip.BestCompression). */
  gzipLevel?: number
  /** Where the uncompressed input is spooled while building (default: os.tmpdir()). Needs the tar's size free. */
  tmpDir?: string
  signal?: AbortSignal
  /** Called now and then with the bytes of the uncompressed tar converted so far. */
  onProgress?: (bytesIn: number) => void
}

export interface BuildResult {
  /** sha256 of the TOC JSON: the layer annotation `containerd.io/snapshot/stargz/toc.digest`. */
  tocDigest: string
  /** sha256 of the uncompressed tar stream written (the layer's DiffID). */
  diffId: string
  uncompressedSize: number
  /** sha256 of the blob written. */
  blobDigest: string
  blobSize: number
  /** Compressed offset of the TOC member. */
  tocOffset: number
  /** The layer annotations a converter writes into the manifest. */
  annotations: Record<string, string>
}

const DEFAULT_CHUNK_SIZE = 4 << 20
const DEFAULT_GZIP_LEVEL = 9
const TOC_TAR_NAME = 'stargz.index.json'
/** Members compressed at once on libuv's threadpool (4 threads by default; one stays free for file reads). */
const MAX_JOBS = 3
/** Uncompressed bytes queued for compression at most (bounds memory next to MAX_JOBS). */
const MAX_QUEUED_BYTES = 48 << 20

/**
 * Converts a tar layer (plain or gzipped) into an eStargz blob written to `output`, laid out as the reference
 * (stargz-snapshotter's estargz.Build, at GOMAXPROCS=1) lays it out: a gzip member per file payload and per
 * chunk, a landmark file, the TOC as a `stargz.index.json` entry in its own member, the tar trailer, and the
 * 51-byte footer. Like the reference it reads the input twice: the tar is spooled to a temporary file first
 * (so prioritized files can be moved to the front and duplicate paths resolved, the last one winning), then
 * converted from there. Chunks are compressed on the threadpool, several at once, and written in order.
 * `output` is ended when the blob is complete; on failure it is destroyed.
 */
export async function buildEstargz(
  input: Input,
  output: NodeJS.WritableStream,
  options: BuildOptions = {}
): Promise<BuildResult> {
  const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE
  const level = options.gzipLevel ?? DEFAULT_GZIP_LEVEL
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 1) throw new RangeError(`chunk size ${chunkSize} is not positive`)
  if (!Number.isInteger(level) || level < 0 || level > 9) throw new RangeError(`gzip level ${level} is not 0-9`)
  options.signal?.throwIfAborted()
  // An output that fails early (say, its file cannot be created) stops the build instead of waiting for phase 2.
  const stop = new AbortController()
  const signal = options.signal === undefined ? stop.signal : AbortSignal.any([options.signal, stop.signal])
  let outputError: unknown
  const onOutputError = (err: unknown) => {
    outputError ??= err
    stop.abort(err)
  }
  output.on('error', onOutputError)
  const dir = await mkdtemp(join(options.tmpDir ?? tmpdir(), 'strata-build-'))
  try {
    const spoolPath = join(dir, 'input.tar')
    const entries = await spool(input, spoolPath, signal)
    const order = orderEntries(entries, options.prioritizedFiles ?? [])
    const handle = await open(spoolPath, 'r')
    try {
      const writer = new BlobWriter(new SpoolReader(handle, spoolPath), chunkSize, level, { ...options, signal })
      await pipeline(writer.blob(order), output, { signal })
      return writer.result()
    } finally {
      await handle.close()
    }
  } catch (err) {
    ;(output as Partial<Writable>).destroy?.()
    throw outputError ?? err
  } finally {
    output.off('error', onOutputError)
    await rm(dir, { recursive: true, force: true })
  }
}

interface Job {
  result: Promise<Buffer>
  size: number
  /** TOC entries whose payload starts this member: their offset is where it lands. */
  entries: TOCEntryJSON[]
}

function gzipMember(data: Buffer, level: number): Promise<Buffer> {
  return new Promise((resolve, reject) => gzip(data, { level }, (err, out) => (err ? reject(err) : resolve(out))))
}

/** Writes one blob: gzip members compressed in parallel and emitted in order, then the TOC and the footer. */
class BlobWriter {
  private readonly diff = digestHasher()
  private readonly blobHash = digestHasher()
  private uncompressed = 0
  private compressed = 0
  /** The open member: uncompressed parts and the entries whose payload starts it. */
  private parts: Buffer[] = []
  private partsLen = 0
  private partsEntries: TOCEntryJSON[] = []
  private readonly jobs: Job[] = []
  private queued = 0
  private readonly lastUname = new Map<number, string>()
  private readonly lastGname = new Map<number, string>()
  private done: BuildResult | undefined

  constructor(
    private readonly reader: SpoolReader,
    private readonly chunkSize: number,
    private readonly level: number,
    private readonly options: BuildOptions
  ) {}

  result(): BuildResult {
    if (this.done === undefined) throw new Error('blob not written yet')
    return this.done
  }

  async *blob(items: Item[]): AsyncGenerator<Buffer> {
    const toc: TOCEntryJSON[] = []
    for (const item of items) {
      this.options.signal?.throwIfAborted()
      if (cleanEntryName(item.header.name) === TOC_TAR_NAME) continue
      yield* this.entry(item, toc)
    }
    yield* this.closeMember()
    while (this.jobs.length > 0) yield await this.emit()

    const tocOffset = this.compressed
    const json = Buffer.from(encodeTOC({ version: 1, entries: toc }))
    const tocTar = Buffer.concat([
      regularFileHeader(TOC_TAR_NAME, json.length),
      json,
      tarPadding(json.length),
      TAR_TRAILER
    ])
    this.diff.update(tocTar)
    this.uncompressed += tocTar.length
    const tocMember = await gzipMember(tocTar, this.level)
    const footer = estargzFooter(tocOffset)
    for (const b of [tocMember, footer]) {
      this.blobHash.update(b)
      this.compressed += b.length
      yield b
    }
    const tocDigest = sha256Digest(json)
    this.done = {
      tocDigest,
      diffId: this.diff.digest(),
      uncompressedSize: this.uncompressed,
      blobDigest: this.blobHash.digest(),
      blobSize: this.compressed,
      tocOffset,
      annotations: { [TOC_DIGEST_ANNOTATION]: tocDigest, [UNCOMPRESSED_SIZE_ANNOTATION]: String(this.uncompressed) }
    }
  }

  /** One entry: its header into the open member; each chunk of a file's content starts a new member. */
  private async *entry(item: Item, toc: TOCEntryJSON[]): AsyncGenerator<Buffer> {
    const h = item.header
    const type = TYPES[h.typeflag]!
    const e: TOCEntryJSON = { name: h.name, type }
    if (type === 'reg') e.size = h.size
    const modtime = formatModtime(h.mtimeSec, h.mtimeNsec)
    if (modtime !== '') e.modtime = modtime
    if (type === 'hardlink' || type === 'symlink') e.linkName = h.linkname
    e.mode = h.mode
    e.uid = h.uid
    e.gid = h.gid
    e.userName = ifChanged(this.lastUname, h.uid, h.uname)
    e.groupName = ifChanged(this.lastGname, h.gid, h.gname)
    if (type === 'char' || type === 'block') {
      e.devMajor = h.devmajor
      e.devMinor = h.devminor
    }
    const xattrs: Record<string, string> = {}
    for (const [k, v] of h.pax) {
      if (k.startsWith('SCHILY.xattr.')) xattrs[k.slice('SCHILY.xattr.'.length)] = Buffer.from(v).toString('base64')
    }
    e.xattrs = xattrs

    this.add(item.raw ?? (await this.reader.read(h.offset, h.dataOffset - h.offset)))
    if (type !== 'reg' || h.size === 0) {
      if (type === 'reg') e.digest = sha256Digest('')
      toc.push(e)
      if (this.partsLen >= this.chunkSize) yield* this.closeMember()
      return
    }
    const file = h.size > this.chunkSize ? digestHasher() : undefined
    let ent = e
    for (let written = 0; written < h.size; ) {
      yield* this.closeMember()
      const n = Math.min(this.chunkSize, h.size - written)
      const data = item.content ?? (await this.reader.read(h.dataOffset + written, n))
      file?.update(data)
      ent.chunkOffset = written
      if (n === this.chunkSize) ent.chunkSize = n
      ent.chunkDigest = sha256Digest(data)
      this.add(data)
      this.partsEntries.push(ent)
      toc.push(ent)
      written += n
      ent = { name: h.name, type: 'chunk' }
    }
    this.add(tarPadding(h.size))
    e.digest = file === undefined ? e.chunkDigest : file.digest()
  }

  private add(b: Buffer): void {
    this.diff.update(b)
    this.uncompressed += b.length
    this.parts.push(b)
    this.partsLen += b.length
  }

  /** Ends the open member: queues it for compression and emits finished members while the queue is full. */
  private async *closeMember(): AsyncGenerator<Buffer> {
    if (this.partsLen === 0) return
    const data = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts, this.partsLen)
    const result = gzipMember(data, this.level)
    result.catch(() => {}) // awaited in order by emit(); this only keeps a failure from being unhandled meanwhile
    this.jobs.push({ result, size: data.length, entries: this.partsEntries })
    this.queued += data.length
    this.parts = []
    this.partsLen = 0
    this.partsEntries = []
    while (this.jobs.length > MAX_JOBS || this.queued > MAX_QUEUED_BYTES) yield await this.emit()
  }

  /** The oldest member, compressed; its entries get their offsets. */
  private async emit(): Promise<Buffer> {
    const job = this.jobs.shift()!
    const out = await job.result
    this.queued -= job.size
    for (const e of job.entries) e.offset = this.compressed
    this.compressed += out.length
    this.blobHash.update(out)
    this.options.onProgress?.(this.uncompressed)
    return out
  }
}

/** The name, unless it is the one the previous entry with this id carried (the reference's nameIfChanged). */
function ifChanged(last: Map<number, string>, id: number, name: string): string | undefined {
  if (name === '' || last.get(id) === name) return undefined
  last.set(id, name)
  return name
}

/** The 51-byte eStargz footer: an empty gzip member whose extra field `SG` holds the TOC offset. */
function estargzFooter(tocOffset: number): Buffer {
  const b = Buffer.alloc(51)
  b.set([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, 0x53, 0x47, 22, 0])
  b.write(`${tocOffset.toString(16).padStart(16, '0')}STARGZ`, 16, 'latin1')
  b.set([0x01, 0x00, 0x00, 0xff, 0xff], 38)
  return b
}
