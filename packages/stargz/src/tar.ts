import { TarHeaderError, TarTruncatedError } from './build-errors.js'

/** One tar entry's header, with PAX and GNU long-name extensions merged in (as Go's archive/tar reads it). */
export interface TarHeader {
  name: string
  /** One character: '0' reg, '1' hardlink, '2' symlink, '3' char, '4' block, '5' dir, '6' fifo, or another. */
  typeflag: string
  mode: number
  uid: number
  gid: number
  /** Declared size (PAX `size` wins over the header field). */
  size: number
  /** Modification time: whole seconds (floor) and nanoseconds [0, 1e9). */
  mtimeSec: number
  mtimeNsec: number
  linkname: string
  uname: string
  gname: string
  devmajor: number
  devminor: number
  /** PAX records of the entry's extended header, values as raw bytes. */
  pax: ReadonlyMap<string, Uint8Array>
  /** Offset of the entry's first header block (including PAX and GNU extension headers) in the tar stream. */
  offset: number
  /** Offset of the entry's content in the tar stream. */
  dataOffset: number
  /** Bytes of content that follow the header (0 for header-only types such as dirs and links). */
  dataSize: number
}

const BLOCK = 512
/** Go's archive/tar limit for PAX and GNU long-name payloads. */
const MAX_SPECIAL_FILE_SIZE = 1 << 20
/** Most header bytes (all extended headers and the header) of one entry: a chain of them is refused past this. */
const MAX_ENTRY_HEADERS = 4 * MAX_SPECIAL_FILE_SIZE
const HEADER_ONLY_TYPES = new Set(['1', '2', '3', '4', '5', '6'])
/** Shared by every entry without an extended header (most of them): one map less per entry in a big index. */
const NO_PAX: ReadonlyMap<string, Uint8Array> = new Map()
const utf8 = new TextDecoder()

type State = 'header' | 'meta' | 'afterZero' | 'end'

/**
 * A push parser of a tar stream: feed it bytes in order with push(), call end() at the end of the input.
 * It returns each entry's header with the offsets of its header blocks and content; the content itself is
 * skipped, so the caller keeps (or spools) the raw bytes it needs. Follows Go's archive/tar reader: ustar,
 * PAX extended headers (path, linkpath, size, uid, gid, uname, gname, mtime, SCHILY.xattr.*), GNU long
 * names and links (`L`, `K`), base-256 numbers; typeflag '\0' is '0' (or '5' when the name ends with '/').
 */
export class TarParser {
  /** Stream offset of the next byte pushed. */
  private pos = 0
  private state: State = 'header'
  /** Payload and padding bytes still to skip. */
  private skip = 0
  private acc: Buffer = Buffer.alloc(BLOCK)
  private accLen = 0
  private want = BLOCK
  private metaType = ''
  private metaSize = 0
  /** Offset of the first header block of the entry being read. */
  private entryStart = -1
  private pax: Map<string, Uint8Array> | undefined
  private longName: string | undefined
  private longLink: string | undefined

  push(chunk: Uint8Array): TarHeader[] {
    const out: TarHeader[] = []
    let i = 0
    while (i < chunk.length) {
      if (this.state === 'end') {
        this.pos += chunk.length - i
        break
      }
      if (this.skip > 0) {
        const n = Math.min(this.skip, chunk.length - i)
        this.skip -= n
        i += n
        this.pos += n
        continue
      }
      const n = Math.min(this.want - this.accLen, chunk.length - i)
      this.acc.set(chunk.subarray(i, i + n), this.accLen)
      this.accLen += n
      i += n
      this.pos += n
      if (this.accLen === this.want) {
        this.accLen = 0
        const header = this.state === 'meta' ? this.meta() : this.block()
        if (header !== undefined) out.push(header)
      }
    }
    return out
  }

  /** Checks that the input did not end inside an entry. */
  end(): void {
    if (this.state === 'end' || this.state === 'afterZero') return
    if (this.skip > 0) throw new TarTruncatedError(`${this.skip} bytes of content and padding missing`, this.pos)
    if (this.accLen > 0 || this.state === 'meta') {
      throw new TarTruncatedError('input ends inside a header block', this.pos - this.accLen)
    }
    if (this.entryStart >= 0) {
      throw new TarTruncatedError('input ends after an extended header, before its entry', this.pos)
    }
  }

  private block(): TarHeader | undefined {
    const blk = this.acc
    const at = this.pos - BLOCK
    const zero = blk.every((b) => b === 0)
    if (this.state === 'afterZero') {
      if (!zero) throw new TarHeaderError('a zero block followed by a non-zero block', at)
      this.state = 'end'
      return undefined
    }
    if (zero) {
      if (this.entryStart >= 0) throw new TarHeaderError('end-of-archive block right after an extended header', at)
      this.state = 'afterZero'
      return undefined
    }
    if (this.entryStart < 0) this.entryStart = at
    verifyChecksum(blk, at)
    const magic = blk.toString('latin1', 257, 265)
    const isUstar = magic.startsWith('ustar\0')
    const isGnu = magic === 'ustar  \0'
    let typeflag = String.fromCharCode(blk[156]!)
    const size = numeric(blk, 124, 12, 'size', at)
    if (size < 0) throw new TarHeaderError(`negative size ${size}`, at)

    if (typeflag === 'x' || typeflag === 'L' || typeflag === 'K') {
      if (size > MAX_SPECIAL_FILE_SIZE) {
        throw new TarHeaderError(`extended header of ${size} bytes (limit ${MAX_SPECIAL_FILE_SIZE})`, at)
      }
      if (this.pos + padded(size) - this.entryStart > MAX_ENTRY_HEADERS) {
        throw new TarHeaderError(`extended headers of more than ${MAX_ENTRY_HEADERS} bytes for one entry`, at)
      }
      this.metaType = typeflag
      this.metaSize = size
      if (size === 0) {
        this.applyMeta(Buffer.alloc(0), at)
        return undefined
      }
      this.state = 'meta'
      this.want = padded(size)
      if (this.acc.length < this.want) this.acc = Buffer.alloc(this.want)
      return undefined
    }

    let name = cString(blk, 0, 100)
    if (isUstar && !isGnu) {
      const prefix = cString(blk, 345, 155)
      if (prefix !== '') name = `${prefix}/${name}`
    }
    const pax = this.pax ?? NO_PAX
    const h: TarHeader = {
      name,
      typeflag,
      mode: numeric(blk, 100, 8, 'mode', at),
      uid: numeric(blk, 108, 8, 'uid', at),
      gid: numeric(blk, 116, 8, 'gid', at),
      size,
      mtimeSec: numeric(blk, 136, 12, 'mtime', at),
      mtimeNsec: 0,
      linkname: cString(blk, 157, 100),
      uname: isUstar || isGnu ? cString(blk, 265, 32) : '',
      gname: isUstar || isGnu ? cString(blk, 297, 32) : '',
      devmajor: isUstar || isGnu ? numeric(blk, 329, 8, 'devmajor', at) : 0,
      devminor: isUstar || isGnu ? numeric(blk, 337, 8, 'devminor', at) : 0,
      pax,
      offset: this.entryStart,
      dataOffset: this.pos,
      dataSize: 0
    }
    mergePax(h, pax, at)
    if (this.longName !== undefined && this.longName !== '') h.name = this.longName
    if (this.longLink !== undefined && this.longLink !== '') h.linkname = this.longLink
    if (typeflag === '\0') {
      typeflag = h.name.endsWith('/') ? '5' : '0'
      h.typeflag = typeflag
    }
    h.dataSize = HEADER_ONLY_TYPES.has(typeflag) ? 0 : h.size
    this.skip = padded(h.dataSize)
    this.entryStart = -1
    this.pax = undefined
    this.longName = undefined
    this.longLink = undefined
    return h
  }

  private meta(): undefined {
    this.state = 'header'
    this.want = BLOCK
    const at = this.entryStart
    this.applyMeta(this.acc.subarray(0, this.metaSize), at)
    return undefined
  }

  private applyMeta(data: Buffer, at: number): void {
    if (this.metaType === 'x') {
      this.pax = parsePax(data, at)
    } else {
      const s = cString(data, 0, data.length)
      if (this.metaType === 'L') this.longName = s
      else this.longLink = s
    }
  }
}

function padded(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK
}

/** The zero bytes that pad `size` bytes of content to a whole block. */
export function tarPadding(size: number): Buffer {
  return Buffer.alloc(padded(size) - size)
}

/** The end-of-archive marker: two zero blocks. */
export const TAR_TRAILER: Buffer = Buffer.alloc(2 * BLOCK)

function cString(b: Buffer, start: number, len: number): string {
  const end = b.indexOf(0, start)
  return utf8.decode(b.subarray(start, end < 0 || end > start + len ? start + len : end))
}

function verifyChecksum(blk: Buffer, at: number): void {
  let unsigned = 0
  let signed = 0
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : blk[i]!
    unsigned += b
    signed += b < 128 ? b : b - 256
  }
  const stored = octal(blk, 148, 8)
  if (stored === undefined || (stored !== unsigned && stored !== signed)) {
    throw new TarHeaderError(`header checksum mismatch (stored ${stored ?? 'unreadable'}, computed ${unsigned})`, at)
  }
}

function octal(b: Buffer, start: number, len: number): number | undefined {
  const s = b
    .toString('latin1', start, start + len)
    .replace(/^[ \0]+|[ \0]+$/g, '')
    .split('\0')[0]!
  if (s === '') return 0
  if (!/^[0-7]+$/.test(s)) return undefined
  return Number.parseInt(s, 8)
}

/** A numeric field: octal, or base-256 when the high bit of the first byte is set. */
function numeric(b: Buffer, start: number, len: number, field: string, at: number): number {
  let n: number | undefined
  if ((b[start]! & 0x80) !== 0) {
    const negative = (b[start]! & 0x40) !== 0
    let x = 0n
    for (let i = 0; i < len; i++) {
      let c = b[start + i]!
      if (negative) c ^= 0xff
      if (i === 0) c &= 0x7f
      x = (x << 8n) | BigInt(c)
    }
    const v = negative ? -x - 1n : x
    if (v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER)) n = Number(v)
  } else {
    n = octal(b, start, len)
  }
  if (n === undefined || !Number.isSafeInteger(n)) {
    throw new TarHeaderError(
      `field ${field} is not a number: ${JSON.stringify(b.toString('latin1', start, start + len))}`,
      at
    )
  }
  return n
}

/** PAX records: `<len> <key>=<value>\n`, len counting the whole record. */
function parsePax(data: Buffer, at: number): Map<string, Uint8Array> {
  const records = new Map<string, Uint8Array>()
  let i = 0
  while (i < data.length) {
    const sp = data.indexOf(0x20, i)
    const lenText = sp < 0 ? '' : data.toString('latin1', i, sp)
    const len = /^\d+$/.test(lenText) ? Number(lenText) : Number.NaN
    if (!(len >= 5) || i + len > data.length || data[i + len - 1] !== 0x0a) {
      throw new TarHeaderError(`malformed PAX record at byte ${i} of the extended header`, at)
    }
    const rec = data.subarray(sp + 1, i + len - 1)
    const eq = rec.indexOf(0x3d)
    if (eq <= 0) throw new TarHeaderError(`PAX record without a key at byte ${i} of the extended header`, at)
    records.set(utf8.decode(rec.subarray(0, eq)), Uint8Array.prototype.slice.call(rec, eq + 1))
    i += len
  }
  return records
}

function mergePax(h: TarHeader, pax: ReadonlyMap<string, Uint8Array>, at: number): void {
  for (const [key, raw] of pax) {
    if (raw.length === 0) continue
    const v = utf8.decode(raw)
    const int = () => {
      if (!/^-?\d+$/.test(v) || !Number.isSafeInteger(Number(v))) {
        throw new TarHeaderError(`PAX record ${key}=${JSON.stringify(v)} is not a whole number`, at)
      }
      return Number(v)
    }
    switch (key) {
      case 'path':
        h.name = v
        break
      case 'linkpath':
        h.linkname = v
        break
      case 'uname':
        h.uname = v
        break
      case 'gname':
        h.gname = v
        break
      case 'uid':
        h.uid = int()
        break
      case 'gid':
        h.gid = int()
        break
      case 'size':
        h.size = int()
        if (h.size < 0) throw new TarHeaderError(`negative PAX size ${h.size}`, at)
        break
      case 'mtime':
        Object.assign(h, paxTime(v, at))
        break
    }
  }
}

/** A PAX time `[-]seconds[.fraction]`, normalised to a floor of seconds and non-negative nanoseconds. */
function paxTime(v: string, at: number): { mtimeSec: number; mtimeNsec: number } {
  const m = /^(-?)(\d+)(?:\.(\d*))?$/.exec(v)
  if (m === null) throw new TarHeaderError(`PAX mtime ${JSON.stringify(v)} is not a time`, at)
  const sec = Number(m[2])
  const nsec = Number((m[3] ?? '').slice(0, 9).padEnd(9, '0'))
  if (!Number.isSafeInteger(sec)) throw new TarHeaderError(`PAX mtime ${JSON.stringify(v)} is out of range`, at)
  if (m[1] === '') return { mtimeSec: sec, mtimeNsec: nsec }
  return nsec === 0 ? { mtimeSec: -sec, mtimeNsec: 0 } : { mtimeSec: -sec - 1, mtimeNsec: 1e9 - nsec }
}

/**
 * A ustar header block for a regular file of `size` bytes named `name` (at most 100 bytes), with every other
 * field zero: byte for byte what Go's tar.Writer writes for `tar.Header{Typeflag: TypeReg, Name, Size}`,
 * which the reference uses for the landmark files and the TOC entry.
 */
export function regularFileHeader(name: string, size: number): Buffer {
  const blk = Buffer.alloc(BLOCK)
  if (Buffer.byteLength(name) > 100) throw new RangeError(`tar name longer than 100 bytes: ${name}`)
  blk.write(name, 0, 'utf8')
  const field = (start: number, len: number, value: number) =>
    blk.write(value.toString(8).padStart(len - 1, '0'), start, 'latin1')
  field(100, 8, 0) // mode
  field(108, 8, 0) // uid
  field(116, 8, 0) // gid
  field(124, 12, size)
  field(136, 12, 0) // mtime
  blk[156] = 0x30 // '0'
  blk.write('ustar\x0000', 257, 'latin1')
  field(329, 8, 0) // devmajor
  field(337, 8, 0) // devminor
  let sum = 0
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : blk[i]!
  blk.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1')
  return blk
}
