/** A small streaming tar reader (ustar, pax, GNU long names): enough to index a layer read once from start to end. */

/** Reads exact byte counts from a stream of buffers and knows its position in the stream. */
export class ByteReader {
  private readonly iterator: AsyncIterator<Uint8Array>
  private pending: Uint8Array[] = []
  private pendingBytes = 0
  /** Bytes consumed so far. */
  position = 0

  constructor(source: AsyncIterable<Uint8Array>) {
    this.iterator = source[Symbol.asyncIterator]()
  }

  /** Buffers until `n` bytes are available; false when the stream ended first. */
  private async fill(n: number): Promise<boolean> {
    while (this.pendingBytes < n) {
      const { value, done } = await this.iterator.next()
      if (done === true) return false
      if (value.byteLength === 0) continue
      this.pending.push(value)
      this.pendingBytes += value.byteLength
    }
    return true
  }

  /** Exactly `n` bytes; fewer only when the stream ends (then all that was left). */
  async read(n: number): Promise<Uint8Array> {
    await this.fill(n)
    const take = Math.min(n, this.pendingBytes)
    const first = this.pending[0]
    let out: Uint8Array
    if (first !== undefined && first.byteLength >= take) {
      out = first.subarray(0, take)
      if (first.byteLength === take) this.pending.shift()
      else this.pending[0] = first.subarray(take)
    } else {
      out = new Uint8Array(take)
      let at = 0
      while (at < take) {
        const b = this.pending[0]!
        const k = Math.min(b.byteLength, take - at)
        out.set(b.subarray(0, k), at)
        at += k
        if (k === b.byteLength) this.pending.shift()
        else this.pending[0] = b.subarray(k)
      }
    }
    this.pendingBytes -= take
    this.position += take
    return out
  }

  /** Skips `n` bytes without keeping them; false when the stream ended first. */
  async skip(n: number): Promise<boolean> {
    let left = n
    while (left > 0) {
      const got = await this.read(Math.min(left, 1 << 20))
      if (got.byteLength === 0) return false
      left -= got.byteLength
    }
    return true
  }

  async close(): Promise<void> {
    await this.iterator.return?.()
  }
}

export type TarType = 'reg' | 'hardlink' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo'

export interface TarHeader {
  name: string
  type: TarType
  mode: number
  uid: number
  gid: number
  size: number
  mtime: number
  linkName: string
  userName: string
  groupName: string
  devMajor: number
  devMinor: number
  /** From pax `SCHILY.xattr.*` records. */
  xattrs: Record<string, Uint8Array>
  /** Offset of the payload in the (decompressed) tar stream. */
  offset: number
}

export class TarFormatError extends Error {
  override readonly name = 'TarFormatError'
  readonly code = 'ERR_TAR_FORMAT'
}

const decoder = new TextDecoder()

function text(block: Uint8Array, start: number, length: number): string {
  const field = block.subarray(start, start + length)
  const end = field.indexOf(0)
  return decoder.decode(end < 0 ? field : field.subarray(0, end))
}

/** An octal field, or a base-256 one (high bit of the first byte set) as GNU tar writes for big values. */
function number(block: Uint8Array, start: number, length: number): number {
  const field = block.subarray(start, start + length)
  if (((field[0] ?? 0) & 0x80) !== 0) {
    let n = (field[0] ?? 0) & 0x7f
    for (const b of field.subarray(1)) n = n * 256 + b
    return n
  }
  const s = text(block, start, length).trim()
  return s === '' ? 0 : Number.parseInt(s, 8)
}

/** Pax extended header records: `LEN KEY=VALUE\n`, LEN counting the whole record in bytes. */
function parsePax(data: Uint8Array): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>()
  let at = 0
  while (at < data.byteLength) {
    const space = data.indexOf(0x20, at)
    if (space < 0) break
    const len = Number.parseInt(decoder.decode(data.subarray(at, space)), 10)
    if (!Number.isFinite(len) || len <= 0 || at + len > data.byteLength)
      throw new TarFormatError('malformed pax header')
    const record = data.subarray(space + 1, at + len - 1)
    const eq = record.indexOf(0x3d)
    if (eq > 0) out.set(decoder.decode(record.subarray(0, eq)), record.subarray(eq + 1))
    at += len
  }
  return out
}

const TYPES: Record<string, TarType> = {
  '0': 'reg',
  '\0': 'reg',
  '7': 'reg',
  '1': 'hardlink',
  '2': 'symlink',
  '3': 'char',
  '4': 'block',
  '5': 'dir',
  '6': 'fifo'
}

/**
 * The entries of a tar stream, in order. The consumer may read up to `header.size` payload bytes from
 * `reader` before asking for the next entry; what it leaves is skipped.
 */
export async function* readTar(reader: ByteReader): AsyncGenerator<TarHeader> {
  let pax = new Map<string, Uint8Array>()
  let longName: string | undefined
  let longLink: string | undefined
  for (;;) {
    const block = await reader.read(512)
    if (block.byteLength === 0 || block.every((b) => b === 0)) return
    if (block.byteLength < 512) throw new TarFormatError('the tar stream ends inside a header')
    const sum = block.reduce((a, b, i) => a + (i >= 148 && i < 156 ? 0x20 : b), 0)
    if (sum !== number(block, 148, 8))
      throw new TarFormatError(`bad header checksum at offset ${reader.position - 512}`)
    const flag = String.fromCharCode(block[156] ?? 0)
    const size = number(block, 124, 12)
    const padded = Math.ceil(size / 512) * 512
    if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
      const data = await reader.read(padded)
      if (data.byteLength < padded) throw new TarFormatError('the tar stream ends inside an extended header')
      const body = data.subarray(0, size)
      if (flag === 'x') pax = parsePax(body)
      else if (flag === 'L') longName = text(body, 0, size)
      else if (flag === 'K') longLink = text(body, 0, size)
      continue
    }
    const prefix = text(block, 345, 155)
    const ustarName = text(block, 0, 100)
    const paxText = (k: string) => {
      const v = pax.get(k)
      return v === undefined ? undefined : decoder.decode(v)
    }
    const paxNumber = (k: string) => {
      const v = paxText(k)
      return v === undefined ? undefined : Number(v)
    }
    const xattrs: Record<string, Uint8Array> = {}
    for (const [k, v] of pax) if (k.startsWith('SCHILY.xattr.')) xattrs[k.slice('SCHILY.xattr.'.length)] = v
    const type = TYPES[flag]
    const header: TarHeader = {
      name: paxText('path') ?? longName ?? (prefix !== '' ? `${prefix}/${ustarName}` : ustarName),
      type: type ?? 'reg',
      mode: number(block, 100, 8) & 0o7777,
      uid: paxNumber('uid') ?? number(block, 108, 8),
      gid: paxNumber('gid') ?? number(block, 116, 8),
      size: paxNumber('size') ?? size,
      mtime: paxNumber('mtime') ?? number(block, 136, 12),
      linkName: paxText('linkpath') ?? longLink ?? text(block, 157, 100),
      userName: paxText('uname') ?? text(block, 265, 32),
      groupName: paxText('gname') ?? text(block, 297, 32),
      devMajor: number(block, 329, 8),
      devMinor: number(block, 337, 8),
      xattrs,
      offset: reader.position
    }
    pax = new Map()
    longName = undefined
    longLink = undefined
    const payloadEnd = header.offset + Math.ceil(header.size / 512) * 512
    // Types this reader does not know (e.g. GNU sparse) are skipped, not misread as files.
    if (type !== undefined) yield header
    const left = payloadEnd - reader.position
    if (left < 0) throw new TarFormatError(`the consumer read past the payload of ${header.name}`)
    if (!(await reader.skip(left))) throw new TarFormatError(`the tar stream ends inside the payload of ${header.name}`)
  }
}
