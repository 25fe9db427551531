/** Cross-package types of the stargz format. The contract other packages code against: change with care. */

import type { AbortOptions } from '@strata/base'

/** Random access to a blob: a local file, a buffer, or a remote blob read with HTTP Range requests. */
export interface ReadAt {
  /** Total size of the blob in bytes. */
  readonly size: number
  /** Exactly `length` bytes from `offset` (fewer only past the end); rejects on I/O failure. */
  readAt(offset: number, length: number, options?: AbortOptions): Promise<Uint8Array>
}

export type Compression = 'gzip' | 'zstd'
export type LayerFormat = 'estargz' | 'stargz' | 'zstd:chunked'
export type EntryType = 'dir' | 'reg' | 'symlink' | 'hardlink' | 'char' | 'block' | 'fifo'

/** One TOC entry exactly as the JSON carries it (fields the format defines; unknown ones are ignored). */
export interface TOCEntryJSON {
  name: string
  type: EntryType | 'chunk'
  size?: number
  modtime?: string
  linkName?: string
  mode?: number
  uid?: number
  gid?: number
  userName?: string
  groupName?: string
  offset?: number
  endOffset?: number
  devMajor?: number
  devMinor?: number
  xattrs?: Record<string, string>
  digest?: string
  chunkOffset?: number
  chunkSize?: number
  chunkDigest?: string
  innerOffset?: number
  chunkType?: string
}

export interface TOCJSON {
  version: number
  entries: TOCEntryJSON[]
}

/**
 * A verifiable unit of file content: the bytes [fileOffset, fileOffset + size) of one file.
 * `digest` is the TOC's chunkDigest; for files whose TOC has no chunk digests (legacy stargz,
 * some zstd:chunked), the file is one Chunk whose digest is the whole-file digest.
 */
export interface Chunk {
  /** `sha256:<hex>` of the uncompressed bytes. */
  digest: string
  fileOffset: number
  /** Uncompressed length. */
  size: number
  /** Compressed range in the layer blob, [offset, end): whole gzip members / zstd frames. */
  offset: number
  end: number
  /** Uncompressed bytes to skip at the start of the decompressed range before the chunk's bytes begin. */
  innerOffset: number
}

/** A file-system entry of one layer, with its name normalised (no `./`, no leading or trailing `/`; root is ''). */
export interface Entry {
  path: string
  type: EntryType
  /** Permission bits plus setuid/setgid/sticky (no file-type bits). */
  mode: number
  uid: number
  gid: number
  userName?: string
  groupName?: string
  size: number
  /** Modification time in milliseconds since the epoch. */
  mtimeMs: number
  /** Symlink target as stored; for hardlinks, the normalised path of the target entry. */
  linkName?: string
  devMajor: number
  devMinor: number
  /** Extended attributes, decoded from base64. */
  xattrs: Record<string, Uint8Array>
  /** Whole-file `sha256:<hex>` (regular files). */
  digest?: string
  /** Content chunks in file order, covering [0, size) without gaps; empty for empty files and non-files. */
  chunks: Chunk[]
}

/** The parsed, validated table of contents of one layer. */
export interface TOC {
  version: number
  /** Every entry by normalised path, including implicit parent directories and the root ''. */
  entries: ReadonlyMap<string, Entry>
  /** Names (not paths) of a directory's children, sorted. */
  children(path: string): string[]
  lookup(path: string): Entry | undefined
  /** Index into entry.chunks of the chunk holding `fileOffset` (binary search); -1 when out of range. */
  chunkIndexAt(entry: Entry, fileOffset: number): number
  /** Entries before `.prefetch.landmark`, in TOC order (empty when the layer has no prioritized files). */
  prioritized: Entry[]
  /** Compressed range [0, prefetchEnd) that holds every prioritized file's payload; 0 when none. */
  prefetchEnd: number
}

/** An opened layer blob: its format, its verified TOC, where the TOC lives. */
export interface Layer {
  format: LayerFormat
  compression: Compression
  /** sha256 of the TOC bytes exactly as stored. */
  tocDigest: string
  /** Compressed offset of the TOC (where payload ends). */
  tocOffset: number
  /** The TOC JSON bytes as stored (uncompressed). */
  tocBytes: Uint8Array
  toc: TOC
  /** The blob's size. */
  size: number
}
