import { promisify } from 'node:util'
import { gunzip, zstdDecompress } from 'node:zlib'
import { type AbortOptions, sha256Digest } from '@strata/base'
import {
  BlobTruncatedError,
  InvalidFooterError,
  TOCDecompressError,
  TOCDigestMismatchError,
  TOCTooLargeError
} from './errors.js'
import { type Footer, MAX_FOOTER_SIZE, parseFooter } from './footer.js'
import { parseTOC } from './toc.js'
import type { Layer, ReadAt } from './types.js'

export interface OpenLayerOptions extends AbortOptions {
  /** Expected TOC digest (the manifest's `containerd.io/snapshot/stargz/toc.digest`): a mismatch is refused. */
  tocDigest?: string
  /**
   * Expected sha256 of the compressed TOC bytes: zstd:chunked layers carry it as the annotation
   * `io.github.containers.zstd-chunked.manifest-checksum` (`io.containers.zstd-chunked.manifest-checksum` from
   * older writers) and often no TOC digest. A mismatch is refused.
   */
  manifestChecksum?: string
  /** Largest TOC accepted, compressed and uncompressed (default 64 MiB). */
  maxTocBytes?: number
}

export const DEFAULT_MAX_TOC_BYTES = 64 * 1024 * 1024
/** Bytes read from the end of the blob in the first read: the footer and, usually, the whole compressed TOC. */
const TAIL_GUESS = 512 * 1024
/** The smallest footer (legacy stargz). */
const MIN_FOOTER_SIZE = 47
const TOC_TAR_NAME = 'stargz.index.json'
const TAR_BLOCK = 512

const gunzipAsync = promisify(gunzip)
const zstdDecompressAsync = promisify(zstdDecompress)

/**
 * Opens an eStargz, legacy stargz or zstd:chunked blob: reads the footer and the TOC (one read of the blob's tail
 * when the TOC fits in it, else one more), inflates and parses the TOC, and checks its digest when `tocDigest` is
 * given.
 */
export async function openLayer(blob: ReadAt, options?: OpenLayerOptions): Promise<Layer> {
  const maxTocBytes = options?.maxTocBytes ?? DEFAULT_MAX_TOC_BYTES
  const size = blob.size
  if (size < MIN_FOOTER_SIZE) {
    throw new InvalidFooterError(`blob is ${size} bytes, too small to hold an eStargz footer`, {
      hint: 'the blob is empty or truncated: pull the layer again'
    })
  }
  const tailStart = Math.max(0, size - Math.max(TAIL_GUESS, MAX_FOOTER_SIZE))
  const tail = await readExactly(blob, tailStart, size - tailStart, 'the footer', options)
  const footer = parseFooter(tail, size)
  if (footer.tocSize > maxTocBytes || (footer.tocUncompressedSize ?? 0) > maxTocBytes) {
    throw tooLarge(Math.max(footer.tocSize, footer.tocUncompressedSize ?? 0), maxTocBytes)
  }
  const compressed =
    footer.tocOffset >= tailStart
      ? tail.subarray(footer.tocOffset - tailStart, footer.tocOffset - tailStart + footer.tocSize)
      : await readExactly(blob, footer.tocOffset, footer.tocSize, 'the TOC', options)
  if (options?.manifestChecksum !== undefined) {
    const actual = sha256Digest(compressed)
    if (actual !== options.manifestChecksum) {
      throw new TOCDigestMismatchError(options.manifestChecksum, actual, { what: 'compressed TOC (manifest checksum)' })
    }
  }
  const tocBytes = await inflateTOC(compressed, footer, maxTocBytes)
  options?.signal?.throwIfAborted()
  const tocDigest = sha256Digest(tocBytes)
  if (options?.tocDigest !== undefined && options.tocDigest !== tocDigest) {
    throw new TOCDigestMismatchError(options.tocDigest, tocDigest)
  }
  const toc = parseTOC(tocBytes, { format: footer.format, tocOffset: footer.tocOffset, blobSize: size })
  return {
    format: footer.format,
    compression: footer.compression,
    tocDigest,
    tocOffset: footer.tocOffset,
    tocBytes,
    toc,
    size
  }
}

async function readExactly(
  blob: ReadAt,
  offset: number,
  length: number,
  what: string,
  options?: AbortOptions
): Promise<Uint8Array> {
  const bytes = await blob.readAt(offset, length, options)
  if (bytes.length !== length) {
    throw new BlobTruncatedError(
      `reading ${what} (${length} bytes at offset ${offset}) got ${bytes.length} bytes from a blob of ${blob.size}`,
      { hint: 'the blob is truncated or changed while being read: pull the layer again' }
    )
  }
  return bytes
}

/** The TOC JSON bytes as stored: a zstd frame, or a gzip member holding a `stargz.index.json` tar entry. */
async function inflateTOC(compressed: Uint8Array, footer: Footer, maxTocBytes: number): Promise<Uint8Array> {
  let inflated: Uint8Array
  try {
    inflated =
      footer.compression === 'zstd'
        ? await zstdDecompressAsync(compressed, { maxOutputLength: maxTocBytes })
        : // The tar entry adds a header, padding and the tar trailer to the JSON.
          await gunzipAsync(compressed, { maxOutputLength: maxTocBytes + 4 * TAR_BLOCK })
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE') throw tooLarge(undefined, maxTocBytes, err)
    throw new TOCDecompressError(
      `the ${footer.compression} TOC at offset ${footer.tocOffset} (${footer.tocSize} bytes) does not inflate: ${(err as Error).message}`,
      { cause: err, hint: 'the blob is corrupted or truncated: pull the layer again' }
    )
  }
  if (footer.compression === 'zstd') {
    if (inflated.length !== footer.tocUncompressedSize) {
      throw new TOCDecompressError(
        `the zstd:chunked TOC inflates to ${inflated.length} bytes, the footer says ${footer.tocUncompressedSize}`
      )
    }
    return inflated
  }
  return tocFromTar(inflated, maxTocBytes)
}

/** The content of the first tar entry, which must be a regular file named `stargz.index.json`. */
function tocFromTar(tar: Uint8Array, maxTocBytes: number): Uint8Array {
  const bad = (why: string) => new TOCDecompressError(`the TOC member is not a ${TOC_TAR_NAME} tar entry: ${why}`)
  if (tar.length < TAR_BLOCK) throw bad(`only ${tar.length} bytes`)
  const header = tar.subarray(0, TAR_BLOCK)
  let sum = 0
  for (let i = 0; i < TAR_BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : header[i]!
  if (octal(header.subarray(148, 156)) !== sum) throw bad('bad header checksum')
  const name = cString(header.subarray(0, 100))
  if (name !== TOC_TAR_NAME) throw bad(`its name is ${JSON.stringify(name)}`)
  const typeflag = header[156]
  if (typeflag !== 0x30 && typeflag !== 0)
    throw bad(`its type is ${JSON.stringify(String.fromCharCode(typeflag ?? 0))}`)
  const size = octal(header.subarray(124, 136))
  if (size === undefined) throw bad('unreadable size field')
  if (size > maxTocBytes) throw tooLarge(size, maxTocBytes)
  if (TAR_BLOCK + size > tar.length) throw bad(`its ${size} bytes run past the end of the member`)
  return tar.slice(TAR_BLOCK, TAR_BLOCK + size)
}

function octal(field: Uint8Array): number | undefined {
  const text = cString(field).trim()
  if (!/^[0-7]{1,12}$/.test(text)) return undefined
  return Number.parseInt(text, 8)
}

function cString(field: Uint8Array): string {
  const end = field.indexOf(0)
  return Buffer.from(field.subarray(0, end < 0 ? field.length : end)).toString('latin1')
}

function tooLarge(size: number | undefined, max: number, cause?: unknown): TOCTooLargeError {
  return new TOCTooLargeError(
    `the TOC is ${size !== undefined ? `${size} bytes, ` : ''}larger than the limit of ${max} bytes`,
    {
      cause,
      hint: 'a TOC this large is unusual; if the layer is trusted, raise the limit (maxTocBytes)'
    }
  )
}
