/**
 * Errors of the stargz package: one class per failure mode, each with a stable `name` and `code`.
 * Match them by `name` (or `code`), not by `instanceof`: copies of this package may be loaded twice.
 */

import { StrataError, type StrataErrorOptions } from '@strata/base'

export type StargzErrorOptions = StrataErrorOptions

/** Base of every error this package throws on bad input. */
export class StargzError extends StrataError {
  override name = 'StargzError'
  override readonly code: string = 'ERR_STARGZ'
}

/** The blob does not end with an eStargz, legacy stargz or zstd:chunked footer, or the footer points outside it. */
export class InvalidFooterError extends StargzError {
  override name = 'InvalidFooterError'
  override readonly code = 'ERR_STARGZ_INVALID_FOOTER'
}

/** The blob ended before bytes the footer or the TOC say it holds. */
export class BlobTruncatedError extends StargzError {
  override name = 'BlobTruncatedError'
  override readonly code = 'ERR_STARGZ_BLOB_TRUNCATED'
}

/** Reading the blob failed (I/O error of the underlying file). */
export class BlobReadError extends StargzError {
  override name = 'BlobReadError'
  override readonly code = 'ERR_STARGZ_BLOB_READ'
}

/** The compressed TOC does not inflate, or is not a `stargz.index.json` tar entry. */
export class TOCDecompressError extends StargzError {
  override name = 'TOCDecompressError'
  override readonly code = 'ERR_STARGZ_TOC_DECOMPRESS'
}

/** The TOC is larger than the configured limit. */
export class TOCTooLargeError extends StargzError {
  override name = 'TOCTooLargeError'
  override readonly code = 'ERR_STARGZ_TOC_TOO_LARGE'
}

/** The TOC's sha256 is not the expected TOC digest (the manifest annotation). */
export class TOCDigestMismatchError extends StargzError {
  override name = 'TOCDigestMismatchError'
  override readonly code = 'ERR_STARGZ_TOC_DIGEST_MISMATCH'
  /** The layer blob and the image it was read for, when the reader knows them (the fetcher does). */
  readonly layer: string | undefined
  readonly image: string | undefined
  constructor(
    readonly expected: string,
    readonly actual: string,
    options: StargzErrorOptions & { what?: string; layer?: string; image?: string } = {}
  ) {
    const where =
      options.layer === undefined
        ? ''
        : `layer ${options.layer}${options.image === undefined ? '' : ` of ${options.image}`}: `
    super(`${where}${options.what ?? 'TOC digest'} mismatch: expected ${expected}, the blob's TOC is ${actual}`, {
      hint:
        options.hint ??
        'the blob does not belong to the manifest that names this TOC digest, or it is corrupted: pull the layer again',
      cause: options.cause
    })
    this.layer = options.layer
    this.image = options.image
  }
}

/** The TOC JSON is malformed or breaks a rule of the format (names, types, sizes, offsets, chunk lists). */
export class InvalidTOCError extends StargzError {
  override name = 'InvalidTOCError'
  override readonly code = 'ERR_STARGZ_INVALID_TOC'
}

/** The TOC uses a version or feature this reader does not support. */
export class UnsupportedTOCError extends StargzError {
  override name = 'UnsupportedTOCError'
  override readonly code = 'ERR_STARGZ_UNSUPPORTED_TOC'
}

/** A chunk's compressed bytes do not inflate. */
export class ChunkDecompressError extends StargzError {
  override name = 'ChunkDecompressError'
  override readonly code = 'ERR_STARGZ_CHUNK_DECOMPRESS'
}

/** A chunk is too large to hold in memory (a whole file of a layer without chunk digests, or a hostile TOC). */
export class ChunkTooLargeError extends StargzError {
  override name = 'ChunkTooLargeError'
  override readonly code = 'ERR_STARGZ_CHUNK_TOO_LARGE'
}

/** A chunk's compressed bytes inflate to fewer bytes than the TOC says the chunk holds. */
export class ChunkTruncatedError extends StargzError {
  override name = 'ChunkTruncatedError'
  override readonly code = 'ERR_STARGZ_CHUNK_TRUNCATED'
}

/** A chunk's bytes do not hash to its digest. */
export class ChunkDigestMismatchError extends StargzError {
  override name = 'ChunkDigestMismatchError'
  override readonly code = 'ERR_STARGZ_CHUNK_DIGEST_MISMATCH'
  constructor(
    readonly digest: string,
    readonly actual: string,
    options: StargzErrorOptions & { path?: string } = {}
  ) {
    super(
      `chunk ${digest}${options.path !== undefined ? ` of ${options.path}` : ''} failed verification: its bytes hash to ${actual}`,
      { hint: options.hint ?? 'the blob is corrupted or was tampered with: pull the layer again', cause: options.cause }
    )
  }
}

/** A whole file's bytes do not hash to the file digest of its TOC entry. */
export class FileDigestMismatchError extends StargzError {
  override name = 'FileDigestMismatchError'
  override readonly code = 'ERR_STARGZ_FILE_DIGEST_MISMATCH'
  constructor(
    readonly path: string,
    readonly digest: string,
    readonly actual: string
  ) {
    super(`file ${path} failed verification: expected ${digest}, its bytes hash to ${actual}`, {
      hint: 'the blob is corrupted or was tampered with: pull the layer again'
    })
  }
}

/** No entry with that path in the layer. */
export class EntryNotFoundError extends StargzError {
  override name = 'EntryNotFoundError'
  override readonly code = 'ERR_STARGZ_ENTRY_NOT_FOUND'
}

/** The entry has no file content to read (a directory, device, fifo or symlink). */
export class NotAFileError extends StargzError {
  override name = 'NotAFileError'
  override readonly code = 'ERR_STARGZ_NOT_A_FILE'
}
