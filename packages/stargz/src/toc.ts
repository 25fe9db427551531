import { isSha256Digest } from '@strata/base'
import { InvalidTOCError, UnsupportedTOCError } from './errors.js'
import { mtime, normaliseName, str, uint, Where, xattrs } from './toc-fields.js'
import type { Chunk, Entry, EntryType, LayerFormat, TOC } from './types.js'

export interface ParseTOCOptions {
  /** zstd:chunked payload ends 8 bytes before tocOffset (the TOC's skippable frame header). */
  format: LayerFormat
  /** Compressed offset of the TOC in the blob: every payload lies before it. */
  tocOffset: number
  blobSize: number
}

export const PREFETCH_LANDMARK = '.prefetch.landmark'
export const NO_PREFETCH_LANDMARK = '.no.prefetch.landmark'
/** zstd:chunked puts the TOC in a skippable frame: its 8-byte header sits between the payload and tocOffset. */
const ZSTD_SKIPPABLE_HEADER_SIZE = 8

const ENTRY_TYPES = new Set<string>(['dir', 'reg', 'symlink', 'hardlink', 'char', 'block', 'fifo', 'chunk'])
const CHUNK_TYPES = new Set(['', 'data', 'zeros'])

/** One piece of a regular file's payload as the TOC lists it (the `reg` entry itself or a `chunk` entry). */
interface Part {
  chunkOffset: number
  size: number
  offset: number
  innerOffset: number
  endOffset?: number
  chunkDigest?: string
}

interface PendingFile {
  entry: Entry
  parts: Part[]
  /** Where the TOC names this file, for messages. */
  where: Where
  /** The chunkSize of the last part, when the TOC gives one. */
  lastChunkSize: number | undefined
}

/**
 * Parses and validates TOC JSON (the bytes exactly as stored; hash them yourself for the TOC digest).
 * Throws InvalidTOCError (or UnsupportedTOCError) naming the entry and the rule it breaks.
 */
export function parseTOC(json: Uint8Array, options: ParseTOCOptions): TOC {
  const { format, tocOffset, blobSize } = options
  if (!Number.isSafeInteger(blobSize) || !Number.isSafeInteger(tocOffset) || tocOffset < 0 || tocOffset > blobSize) {
    throw new InvalidTOCError(`TOC offset ${tocOffset} is outside the blob (${blobSize} bytes)`)
  }
  const payloadEnd =
    format === 'zstd:chunked' && tocOffset >= ZSTD_SKIPPABLE_HEADER_SIZE
      ? tocOffset - ZSTD_SKIPPABLE_HEADER_SIZE
      : tocOffset
  const doc = decodeJSON(json)
  if (typeof doc.version !== 'number') throw new InvalidTOCError('TOC has no numeric "version"')
  if (doc.version !== 1) {
    throw new UnsupportedTOCError(`TOC version ${doc.version} is not supported (only version 1)`, {
      hint: 'the layer was written by a newer tool than this strata understands'
    })
  }
  if (!Array.isArray(doc.entries)) throw new InvalidTOCError('TOC has no "entries" array')
  return new TOCParser(payloadEnd).build(doc.entries as unknown[])
}

function decodeJSON(json: Uint8Array): Record<string, unknown> {
  let doc: unknown
  try {
    doc = JSON.parse(new TextDecoder('utf-8', { fatal: true, ignoreBOM: false }).decode(json))
  } catch (err) {
    throw new InvalidTOCError(`TOC is not valid UTF-8 JSON: ${(err as Error).message}`, { cause: err })
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) {
    throw new InvalidTOCError('TOC JSON is not an object')
  }
  return doc as Record<string, unknown>
}

/** The normalised key for a path given by a caller (`/etc/passwd`, `./etc/`, `etc`); undefined for `..` paths. */
function lookupKey(path: string): string | undefined {
  const parts = path.split('/').filter((p) => p !== '' && p !== '.')
  return parts.includes('..') ? undefined : parts.join('/')
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/')
  return i < 0 ? '' : path.slice(0, i)
}

/** A directory the TOC implies (a parent of an entry) but does not list: root-owned, 0755, epoch. */
export function implicitDir(path: string): Entry {
  return {
    path,
    type: 'dir',
    mode: 0o755,
    uid: 0,
    gid: 0,
    size: 0,
    mtimeMs: 0,
    devMajor: 0,
    devMinor: 0,
    xattrs: {},
    chunks: []
  }
}

class TOCParser {
  private readonly entries = new Map<string, Entry>([['', implicitDir('')]])
  private readonly implicit = new Set<string>([''])
  private readonly children = new Map<string, Set<string>>()
  private readonly files: PendingFile[] = []
  private readonly hardlinks: { entry: Entry; where: Where }[] = []
  /** Start offsets of every payload in the blob: a payload's compressed range ends at the next one. */
  private readonly payloadOffsets: number[] = []
  private current: PendingFile | undefined
  private prioritized: Entry[] = []
  private beforeLandmark: Entry[] = []
  private prefetchLandmarkOffset: number | undefined
  private sawPrefetchLandmark = false

  constructor(private readonly payloadEnd: number) {}

  build(raw: unknown[]): TOC {
    raw.forEach((r, i) => {
      this.add(r, i)
    })
    this.current = undefined
    this.payloadOffsets.sort((a, b) => a - b)
    for (const f of this.files) this.finishFile(f)
    for (const h of this.hardlinks) this.resolveHardlink(h.entry, h.where)
    return this.toc()
  }

  private add(raw: unknown, index: number): void {
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
      throw new InvalidTOCError(`TOC entry #${index} is not an object`)
    }
    const e = raw as Record<string, unknown>
    if (typeof e.name !== 'string') throw new InvalidTOCError(`TOC entry #${index} has no string "name"`)
    const where = new Where(index, e.name)
    const type = e.type
    if (typeof type !== 'string' || !ENTRY_TYPES.has(type)) {
      throw new InvalidTOCError(`${where}: unknown type ${JSON.stringify(type)}`)
    }
    const path = normaliseName(e.name, where)
    if (type === 'chunk') {
      this.addChunk(e, path, where)
      return
    }
    this.current = undefined
    if (path === NO_PREFETCH_LANDMARK || path === PREFETCH_LANDMARK) {
      this.addLandmark(e, path, where)
      return
    }
    const entry = this.entry(e, type as EntryType, path, where)
    this.insert(entry, where)
    if (!this.sawPrefetchLandmark) this.beforeLandmark.push(entry)
    if (entry.type === 'reg') this.startFile(e, entry, where)
    if (entry.type === 'hardlink') this.hardlinks.push({ entry, where })
  }

  private entry(e: Record<string, unknown>, type: EntryType, path: string, where: Where): Entry {
    const entry: Entry = {
      path,
      type,
      mode: (uint(e, 'mode', where) ?? 0) & 0o7777,
      uid: uint(e, 'uid', where) ?? 0,
      gid: uint(e, 'gid', where) ?? 0,
      size: type === 'reg' ? (uint(e, 'size', where) ?? 0) : 0,
      mtimeMs: mtime(e.modtime, where),
      devMajor: uint(e, 'devMajor', where) ?? 0,
      devMinor: uint(e, 'devMinor', where) ?? 0,
      xattrs: xattrs(e.xattrs, where),
      chunks: []
    }
    const userName = str(e, 'userName', where)
    const groupName = str(e, 'groupName', where)
    if (userName !== undefined) entry.userName = userName
    if (groupName !== undefined) entry.groupName = groupName
    if (type === 'symlink' || type === 'hardlink') {
      const link = str(e, 'linkName', where)
      if (link === undefined || (link === '' && type === 'symlink')) {
        throw new InvalidTOCError(`${where}: ${type} without a linkName`)
      }
      if (type === 'hardlink') {
        entry.linkName = normaliseName(link, where, 'hardlink target')
      } else {
        if (link.includes('\0')) throw new InvalidTOCError(`${where}: linkName contains a NUL byte`)
        entry.linkName = link
      }
    }
    if (type === 'reg') {
      const digest = e.digest
      if (digest !== undefined && !isSha256Digest(digest)) {
        throw new InvalidTOCError(`${where}: digest ${JSON.stringify(digest)} is not a sha256 digest`)
      }
      if (digest !== undefined) entry.digest = digest
    }
    return entry
  }

  private insert(entry: Entry, where: Where): void {
    const existing = this.entries.get(entry.path)
    if (existing !== undefined) {
      if (!this.implicit.has(entry.path)) {
        throw new InvalidTOCError(`${where}: duplicate entry for ${entry.path === '' ? 'the root' : entry.path}`)
      }
      if (entry.type !== 'dir') {
        throw new InvalidTOCError(`${where}: ${entry.path || 'the root'} holds other entries but is a ${entry.type}`)
      }
      this.implicit.delete(entry.path)
    }
    this.entries.set(entry.path, entry)
    if (entry.path === '') return
    // Link the entry to its parent, creating implicit parents up to the root.
    let child = entry.path
    for (;;) {
      const parent = parentOf(child)
      const p = this.entries.get(parent)
      if (p !== undefined && p.type !== 'dir') {
        throw new InvalidTOCError(`${where}: ${parent} is a ${p.type}, not a directory, but holds ${entry.path}`)
      }
      let names = this.children.get(parent)
      if (names === undefined) {
        names = new Set()
        this.children.set(parent, names)
      }
      names.add(child.slice(parent === '' ? 0 : parent.length + 1))
      if (p !== undefined) return
      this.entries.set(parent, implicitDir(parent))
      this.implicit.add(parent)
      child = parent
    }
  }

  private addLandmark(e: Record<string, unknown>, path: string, where: Where): void {
    const offset = uint(e, 'offset', where)
    if (offset !== undefined && (uint(e, 'size', where) ?? 0) > 0) this.addPayloadOffset(offset, where)
    if (path === PREFETCH_LANDMARK) {
      if (this.sawPrefetchLandmark) throw new InvalidTOCError(`${where}: a second ${PREFETCH_LANDMARK}`)
      this.sawPrefetchLandmark = true
      this.prioritized = this.beforeLandmark
      this.prefetchLandmarkOffset = offset
    }
  }

  private startFile(e: Record<string, unknown>, entry: Entry, where: Where): void {
    if (entry.size === 0) return
    const chunkSize = uint(e, 'chunkSize', where)
    const chunkOffset = uint(e, 'chunkOffset', where) ?? 0
    if (chunkOffset !== 0)
      throw new InvalidTOCError(`${where}: the first chunk of a file starts at ${chunkOffset}, not 0`)
    const file: PendingFile = { entry, parts: [], where, lastChunkSize: chunkSize }
    file.parts.push(this.part(e, 0, chunkSize, where))
    this.files.push(file)
    this.current = file
  }

  private addChunk(e: Record<string, unknown>, path: string, where: Where): void {
    const file = this.current
    if (file === undefined || file.entry.path !== path) {
      throw new InvalidTOCError(`${where}: chunk entry does not follow the regular file or chunks of ${path}`)
    }
    const prev = file.parts[file.parts.length - 1]!
    if (file.lastChunkSize === undefined) {
      throw new InvalidTOCError(
        `${where}: the chunk before this one has no chunkSize, so it ran to the end of the file`
      )
    }
    const expected = prev.chunkOffset + prev.size
    const chunkOffset = uint(e, 'chunkOffset', where)
    if (chunkOffset !== expected) {
      throw new InvalidTOCError(
        `${where}: chunks out of order: chunkOffset ${chunkOffset ?? 'missing'}, expected ${expected} (after the previous chunk)`
      )
    }
    const chunkSize = uint(e, 'chunkSize', where)
    file.lastChunkSize = chunkSize
    file.parts.push(this.part(e, expected, chunkSize, where))
  }

  /** A piece of payload; its size is known now unless it is the last one, which runs to the end of the file. */
  private part(e: Record<string, unknown>, chunkOffset: number, chunkSize: number | undefined, where: Where): Part {
    const offset = uint(e, 'offset', where)
    if (offset === undefined) throw new InvalidTOCError(`${where}: file content without an "offset" in the blob`)
    this.addPayloadOffset(offset, where)
    if (chunkSize === 0) throw new InvalidTOCError(`${where}: chunkSize 0`)
    const part: Part = { chunkOffset, size: chunkSize ?? 0, offset, innerOffset: uint(e, 'innerOffset', where) ?? 0 }
    const endOffset = uint(e, 'endOffset', where)
    if (endOffset !== undefined) {
      if (endOffset <= offset || endOffset > this.payloadEnd) {
        throw new InvalidTOCError(`${where}: endOffset ${endOffset} is not in (${offset}, ${this.payloadEnd}]`)
      }
      part.endOffset = endOffset
    }
    // containers/storage marks runs of zeros "zeros"; their bytes are in the blob like any other chunk's.
    if (e.chunkType !== undefined && !CHUNK_TYPES.has(e.chunkType as string)) {
      throw new UnsupportedTOCError(`${where}: chunkType ${JSON.stringify(e.chunkType)} is not supported`)
    }
    if (e.chunkDigest !== undefined) {
      if (!isSha256Digest(e.chunkDigest)) {
        throw new InvalidTOCError(`${where}: chunkDigest ${JSON.stringify(e.chunkDigest)} is not a sha256 digest`)
      }
      part.chunkDigest = e.chunkDigest
    }
    return part
  }

  private addPayloadOffset(offset: number, where: Where): void {
    if (offset >= this.payloadEnd) {
      throw new InvalidTOCError(`${where}: offset ${offset} is past the payload, which ends at ${this.payloadEnd}`)
    }
    this.payloadOffsets.push(offset)
  }

  /** Sizes the last part, checks the parts cover the file, and turns them into Chunks. */
  private finishFile(file: PendingFile): void {
    const { entry, parts, where } = file
    const last = parts[parts.length - 1]!
    if (file.lastChunkSize === undefined) {
      if (last.chunkOffset >= entry.size) {
        throw new InvalidTOCError(`${where}: chunk at ${last.chunkOffset} starts past the file's size ${entry.size}`)
      }
      last.size = entry.size - last.chunkOffset
    }
    // On a chunked file the reg entry's endOffset (containers/storage) is where the whole file's payload ends.
    const first = parts[0]!
    if (parts.length > 1 && first.endOffset !== undefined) {
      last.endOffset ??= first.endOffset
      delete first.endOffset
      if (last.endOffset <= last.offset) {
        throw new InvalidTOCError(`${where}: endOffset ${last.endOffset} is before the last chunk at ${last.offset}`)
      }
    }
    const covered = last.chunkOffset + last.size
    if (!Number.isSafeInteger(covered) || covered !== entry.size) {
      throw new InvalidTOCError(`${where}: chunks cover ${covered} bytes of a ${entry.size}-byte file`)
    }
    for (let i = 1; i < parts.length; i++) {
      const a = parts[i - 1]!
      const b = parts[i]!
      if (b.offset < a.offset || (b.offset === a.offset && b.innerOffset <= a.innerOffset)) {
        throw new InvalidTOCError(`${where}: chunks out of order in the blob (offset ${b.offset} after ${a.offset})`)
      }
    }
    if (parts.every((p) => p.chunkDigest !== undefined)) {
      entry.chunks = parts.map((p) => ({
        digest: p.chunkDigest!,
        fileOffset: p.chunkOffset,
        size: p.size,
        offset: p.offset,
        end: this.endOf(p),
        innerOffset: p.innerOffset
      }))
      return
    }
    if (entry.digest === undefined) {
      throw new InvalidTOCError(`${where}: a file without chunk digests needs a whole-file digest to be verified`)
    }
    entry.chunks = [
      {
        digest: entry.digest,
        fileOffset: 0,
        size: entry.size,
        offset: first.offset,
        end: this.endOf(last),
        innerOffset: first.innerOffset
      }
    ]
  }

  /** The end of a payload's compressed range: endOffset if given, else the next payload's start, else the TOC. */
  private endOf(p: Part): number {
    if (p.endOffset !== undefined) return p.endOffset
    const offsets = this.payloadOffsets
    let lo = 0
    let hi = offsets.length
    while (lo < hi) {
      const mid = (lo + hi) >>> 1
      if (offsets[mid]! <= p.offset) lo = mid + 1
      else hi = mid
    }
    return offsets[lo] ?? this.payloadEnd
  }

  private resolveHardlink(entry: Entry, where: Where): void {
    let target = this.entries.get(entry.linkName!)
    for (let hops = 0; target?.type === 'hardlink' && hops < this.hardlinks.length; hops++) {
      target = this.entries.get(target.linkName!)
    }
    if (target === undefined || this.implicit.has(target.path)) {
      throw new InvalidTOCError(`${where}: hardlink to ${entry.linkName}, which is not in the layer`)
    }
    if (target.type === 'hardlink') throw new InvalidTOCError(`${where}: hardlinks form a cycle`)
    if (target.type === 'dir') throw new InvalidTOCError(`${where}: hardlink to the directory ${target.path}`)
    entry.linkName = target.path
    if (target.type === 'reg') {
      entry.size = target.size
      entry.chunks = target.chunks
      if (target.digest !== undefined) entry.digest = target.digest
    }
  }

  private toc(): TOC {
    const entries = this.entries
    const children = new Map<string, string[]>()
    for (const [dir, names] of this.children) children.set(dir, [...names].sort())
    const prioritized = this.prioritized
    let prefetchEnd = 0
    if (prioritized.length > 0 || this.sawPrefetchLandmark) {
      prefetchEnd = this.prefetchLandmarkOffset ?? 0
      if (this.prefetchLandmarkOffset === undefined) {
        for (const e of prioritized) for (const c of e.chunks) prefetchEnd = Math.max(prefetchEnd, c.end)
      }
    }
    return {
      version: 1,
      entries,
      children: (path) => {
        const key = lookupKey(path)
        return key === undefined ? [] : [...(children.get(key) ?? [])]
      },
      lookup: (path) => {
        // Keys are normalised, so a hit on the path as given is the answer; else normalise it.
        const hit = entries.get(path)
        if (hit !== undefined) return hit
        const key = lookupKey(path)
        return key === undefined ? undefined : entries.get(key)
      },
      chunkIndexAt,
      prioritized,
      prefetchEnd
    }
  }
}

/** Index into entry.chunks of the chunk holding `fileOffset`; -1 when out of range. */
export function chunkIndexAt(entry: Entry, fileOffset: number): number {
  const chunks: Chunk[] = entry.chunks
  let lo = 0
  let hi = chunks.length - 1
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1
    const c = chunks[mid]!
    if (fileOffset < c.fileOffset) hi = mid - 1
    else if (fileOffset >= c.fileOffset + c.size) lo = mid + 1
    else return mid
  }
  return -1
}
