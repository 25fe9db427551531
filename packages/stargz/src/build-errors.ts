import { StargzError, type StargzErrorOptions } from './errors.js'

/** A tar header block is malformed: bad checksum, bad number field, bad PAX record, or a hostile size. */
export class TarHeaderError extends StargzError {
  override name = 'TarHeaderError'
  override readonly code = 'ERR_STARGZ_TAR_HEADER'
  constructor(
    message: string,
    /** Offset of the bad header block in the uncompressed tar stream. */
    readonly offset: number,
    options: StargzErrorOptions = {}
  ) {
    super(`bad tar header at offset ${offset}: ${message}`, {
      hint: options.hint ?? 'the input is not a valid tar archive, or it is corrupted: recreate it',
      cause: options.cause
    })
  }
}

/** The tar stream ended in the middle of a header or a file's content. */
export class TarTruncatedError extends StargzError {
  override name = 'TarTruncatedError'
  override readonly code = 'ERR_STARGZ_TAR_TRUNCATED'
  constructor(
    message: string,
    readonly offset: number
  ) {
    super(`tar input is truncated at offset ${offset}: ${message}`, {
      hint: 'the input was cut short (an interrupted download or copy?): fetch or create it again'
    })
  }
}

/** The tar holds an entry the eStargz format cannot carry (sparse files, global PAX headers, volume labels...). */
export class UnsupportedTarEntryError extends StargzError {
  override name = 'UnsupportedTarEntryError'
  override readonly code = 'ERR_STARGZ_TAR_UNSUPPORTED_ENTRY'
  constructor(
    message: string,
    readonly path: string,
    readonly offset: number
  ) {
    super(`tar entry ${JSON.stringify(path)} at offset ${offset}: ${message}`, {
      hint: 'recreate the tar without it (GNU tar: no --sparse, --format=pax or gnu without volume labels)'
    })
  }
}

/**
 * A tar entry's name or hardlink target breaks the rule of layer names (names.ts: `..`, absolute, NUL, empty): it
 * could put a file outside the layer, and strata's TOC parser would refuse the layer, so it is not built.
 */
export class UnsafeTarEntryError extends StargzError {
  override name = 'UnsafeTarEntryError'
  override readonly code = 'ERR_STARGZ_TAR_UNSAFE_ENTRY'
  constructor(
    /** Why, in the words of the TOC parser (`name "../x" contains '..' and could escape the layer`). */
    readonly reason: string,
    readonly path: string,
    readonly offset: number
  ) {
    super(`tar entry ${JSON.stringify(path.slice(0, 200))} at offset ${offset}: ${reason}`, {
      hint: 'the tar names a file outside its root (or by an empty name, or one with a NUL byte): it is hostile or made wrongly; recreate it with relative names (tar -C DIR -cf OUT .)'
    })
  }
}

/** A gzipped input does not inflate. */
export class InputDecompressError extends StargzError {
  override name = 'InputDecompressError'
  override readonly code = 'ERR_STARGZ_INPUT_DECOMPRESS'
}

/** A prioritized file (or the target of a prioritized hardlink) is not in the tar. */
export class PrioritizedFileNotFoundError extends StargzError {
  override name = 'PrioritizedFileNotFoundError'
  override readonly code = 'ERR_STARGZ_PRIORITIZED_NOT_FOUND'
  constructor(readonly path: string) {
    super(`prioritized file ${JSON.stringify(path)} is not in the input tar`, {
      hint: 'list paths as they are inside the layer (e.g. usr/bin/env or /usr/bin/env), one per line'
    })
  }
}

/** The temporary spool file of a build could not be written or read. */
export class BuildSpoolError extends StargzError {
  override name = 'BuildSpoolError'
  override readonly code = 'ERR_STARGZ_BUILD_SPOOL'
}
