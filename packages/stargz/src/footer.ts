import { InvalidFooterError } from './errors.js'
import type { Compression, LayerFormat } from './types.js'

/** Where a blob's TOC lives, as its footer says. */
export interface Footer {
  format: LayerFormat
  compression: Compression
  /** Bytes the footer takes at the end of the blob. */
  size: number
  /** Compressed offset of the TOC: where the payload ends. */
  tocOffset: number
  /** Compressed length of the TOC: it is [tocOffset, tocOffset + tocSize) of the blob. */
  tocSize: number
  /** zstd:chunked only: the uncompressed length of the TOC JSON. */
  tocUncompressedSize?: number
}

/** The most bytes any footer takes: read at least this many from the end of a blob for parseFooter. */
export const MAX_FOOTER_SIZE = 72

const ESTARGZ_FOOTER_SIZE = 51
const LEGACY_FOOTER_SIZE = 47
const ZSTD_SKIPPABLE_HEADER_SIZE = 8
/** Sizes of the zstd:chunked footer's data: 5 x 8 bytes (eStargz reference), 8 x 8 bytes (containers/storage). */
const ZSTD_FOOTER_DATA_SIZES = [40, 64]
/** Magic of a zstd skippable frame (0x184D2A50), as stored (little endian). */
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50
const ZSTD_CHUNKED_MAGIC = 'GnUlInUx'
const ZSTD_CHUNKED_MANIFEST_TYPE = 1n

/**
 * Parses the footer of a blob of `blobSize` bytes from `tail`, its last bytes (at least MAX_FOOTER_SIZE of
 * them, or the whole blob if it is smaller). Tries zstd:chunked (48 or 72 bytes), then eStargz (51 bytes), then
 * legacy stargz (47 bytes). Throws InvalidFooterError when none fits or when the TOC would lie outside the blob.
 */
export function parseFooter(tail: Uint8Array, blobSize: number): Footer {
  if (!Number.isSafeInteger(blobSize) || blobSize < tail.length) {
    throw new InvalidFooterError(`blob size ${blobSize} is smaller than the ${tail.length} tail bytes given`)
  }
  if (tail.length < Math.min(MAX_FOOTER_SIZE, blobSize)) {
    throw new InvalidFooterError(`need the last ${MAX_FOOTER_SIZE} bytes of the blob to find its footer`)
  }
  const footer =
    zstdChunkedFooter(tail) ?? gzipFooter(tail, ESTARGZ_FOOTER_SIZE) ?? gzipFooter(tail, LEGACY_FOOTER_SIZE)
  if (footer === undefined) {
    throw new InvalidFooterError(
      `no eStargz, stargz or zstd:chunked footer in the last ${Math.min(MAX_FOOTER_SIZE, blobSize)} bytes of the blob (${blobSize} bytes)`,
      { hint: 'the layer is not eStargz (plain gzip or zstd, or a truncated download): convert it, or pull it whole' }
    )
  }
  const payloadEnd = blobSize - footer.size
  const tocSize = footer.tocSize ?? payloadEnd - footer.tocOffset
  if (footer.tocOffset >= payloadEnd || tocSize <= 0 || footer.tocOffset + tocSize > payloadEnd) {
    throw new InvalidFooterError(
      `${footer.format} footer puts the TOC at offset ${footer.tocOffset}` +
        `${footer.tocSize !== undefined ? ` (${footer.tocSize} bytes)` : ''}, outside the blob's ${payloadEnd} bytes before the footer`,
      { hint: 'the blob is truncated or corrupted: pull the layer again' }
    )
  }
  return { ...footer, tocSize }
}

/** A footer as found, before its TOC range is checked against the blob (gzip footers do not store the TOC size). */
type Found = Omit<Footer, 'tocSize'> & { tocSize?: number }

/**
 * A zstd skippable frame at the very end holding little-endian uint64s: TOC offset, compressed size,
 * uncompressed size, manifest type (1), then the magic `GnUlInUx`. The eStargz reference writes these 40 bytes;
 * containers/storage writes 64, with the tar-split position between the type and the magic.
 */
function zstdChunkedFooter(tail: Uint8Array): Found | undefined {
  if (tail.length < 16 || ascii(tail.subarray(tail.length - 8)) !== ZSTD_CHUNKED_MAGIC) return undefined
  for (const dataSize of ZSTD_FOOTER_DATA_SIZES) {
    const size = ZSTD_SKIPPABLE_HEADER_SIZE + dataSize
    if (tail.length < size) continue
    const f = tail.subarray(tail.length - size)
    const view = new DataView(f.buffer, f.byteOffset, f.byteLength)
    if (view.getUint32(0, true) !== ZSTD_SKIPPABLE_MAGIC || view.getUint32(4, true) !== dataSize) continue
    const manifestType = view.getBigUint64(32, true)
    if (manifestType !== ZSTD_CHUNKED_MANIFEST_TYPE) {
      throw new InvalidFooterError(`zstd:chunked footer has manifest type ${manifestType}, expected 1 (a TOC)`)
    }
    return {
      format: 'zstd:chunked',
      compression: 'zstd',
      size,
      tocOffset: safeU64(view, 8, 'TOC offset'),
      tocSize: safeU64(view, 16, 'compressed TOC size'),
      tocUncompressedSize: safeU64(view, 24, 'uncompressed TOC size')
    }
  }
  throw new InvalidFooterError(
    `zstd:chunked footer is not in a zstd skippable frame of ${ZSTD_FOOTER_DATA_SIZES.join(' or ')} bytes`
  )
}

/**
 * An empty gzip member whose header carries the TOC offset in its extra field: as a subfield `SG` (eStargz, 51
 * bytes) or raw (legacy stargz, 47 bytes): `%016x` + `STARGZ`.
 */
function gzipFooter(tail: Uint8Array, size: number): Found | undefined {
  if (tail.length < size) return undefined
  const f = tail.subarray(tail.length - size)
  const xlen = size === ESTARGZ_FOOTER_SIZE ? 26 : 22
  if (f[0] !== 0x1f || f[1] !== 0x8b || f[2] !== 8 || f[3] !== 4 || f[10] !== xlen || f[11] !== 0) return undefined
  let extra = f.subarray(12, 12 + xlen)
  if (size === ESTARGZ_FOOTER_SIZE) {
    if (extra[0] !== 0x53 || extra[1] !== 0x47 || extra[2] !== 22 || extra[3] !== 0) return undefined
    extra = extra.subarray(4)
  }
  const text = ascii(extra)
  if (!/^[0-9a-fA-F]{16}STARGZ$/.test(text)) return undefined
  const tocOffset = Number.parseInt(text.slice(0, 16), 16)
  if (!Number.isSafeInteger(tocOffset)) {
    throw new InvalidFooterError(`stargz footer has an impossible TOC offset 0x${text.slice(0, 16)}`)
  }
  return { format: size === ESTARGZ_FOOTER_SIZE ? 'estargz' : 'stargz', compression: 'gzip', size, tocOffset }
}

function safeU64(view: DataView, at: number, what: string): number {
  const v = view.getBigUint64(at, true)
  if (v > BigInt(Number.MAX_SAFE_INTEGER))
    throw new InvalidFooterError(`zstd:chunked footer has an impossible ${what} ${v}`)
  return Number(v)
}

function ascii(bytes: Uint8Array): string {
  return String.fromCharCode(...bytes)
}
