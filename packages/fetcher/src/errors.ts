import { StrataError } from '@strata/base'

/** Errors of the read path: one class per failure mode, matched by `name` (stable) or `code`. */

/** No source could give a chunk (each missed, failed, or returned bytes that did not verify). */
export class ChunkUnavailableError extends StrataError {
  override readonly name = 'ChunkUnavailableError'
  override readonly code = 'ERR_CHUNK_UNAVAILABLE'
  override readonly hint =
    'check that the registry is reachable and still holds the layer (p2pctl status shows peers); a source that returned bad bytes is named above'
  constructor(
    readonly digest: string,
    readonly layer: string,
    /** What each source said, in the order asked, e.g. `registry: HTTP 503`. */
    readonly attempts: string[],
    options?: { cause?: unknown }
  ) {
    super(
      `chunk ${digest} of layer ${layer} is unavailable: ${attempts.length === 0 ? 'no sources configured' : attempts.join('; ')}`,
      options
    )
  }
}

/** `requireVerified` was asked and a layer has no TOC-digest annotation to verify its TOC against. */
export class UnverifiedLayerError extends StrataError {
  override readonly name = 'UnverifiedLayerError'
  override readonly code = 'ERR_UNVERIFIED_LAYER'
  override readonly hint =
    'convert the image with p2pctl (it writes the containerd.io/snapshot/stargz/toc.digest annotation), or open it without requireVerified'
  constructor(
    readonly image: string,
    readonly layer: string
  ) {
    super(
      `layer ${layer} of ${image} has no containerd.io/snapshot/stargz/toc.digest annotation: its TOC cannot be verified`
    )
  }
}

/** A whole layer download did not hash to the layer digest. */
export class LayerDigestMismatchError extends StrataError {
  override readonly name = 'LayerDigestMismatchError'
  override readonly code = 'ERR_LAYER_DIGEST_MISMATCH'
  override readonly hint =
    'the registry served different bytes than the manifest names: retry, and check any proxy or mirror in between'
  constructor(
    readonly image: string,
    readonly layer: string,
    readonly actual: string
  ) {
    super(`layer ${layer} of ${image}: downloaded bytes hash to ${actual}`)
  }
}

/** A layer blob is neither eStargz nor a tar this fetcher can index (tar, tar+gzip, tar+zstd). */
export class UnsupportedLayerError extends StrataError {
  override readonly name = 'UnsupportedLayerError'
  override readonly code = 'ERR_UNSUPPORTED_LAYER'
  constructor(
    readonly image: string,
    readonly layer: string,
    readonly reason: string,
    options?: { cause?: unknown }
  ) {
    super(`layer ${layer} of ${image} cannot be read: ${reason}`, options)
  }
}

/**
 * A source asked for a chunk made no progress (no chunk, no bytes, for anyone) for its liveness timeout; or, when
 * `stalledMs` is set, for the shorter time a source found stalled gets (it had made none for `stalledMs`).
 */
export class SourceTimeoutError extends StrataError {
  override readonly name = 'SourceTimeoutError'
  override readonly code = 'ERR_SOURCE_TIMEOUT'
  readonly stalledMs: number | undefined
  constructor(
    readonly source: string,
    readonly digest: string,
    readonly timeoutMs: number,
    options?: { stalledMs?: number }
  ) {
    super(
      `source ${source} made no progress for ${timeoutMs} ms while asked for chunk ${digest}` +
        (options?.stalledMs === undefined ? '' : ` (it is stalled: none for ${options.stalledMs} ms)`)
    )
    this.stalledMs = options?.stalledMs
  }
}

/**
 * Bytes a source received for chunks are not those chunks (a compressed member that does not inflate): bad bytes,
 * as a failed digest check is. Thrown by a source's `getMany` after it has handed over the chunks it could; the
 * fetcher counts each as a verification failure of that source and asks again (see FetcherInit.badBytesRetries).
 * `cause` is what happened to the other chunks it could not give, if anything did.
 */
export class BadChunkBytesError extends StrataError {
  override readonly name = 'BadChunkBytesError'
  override readonly code = 'ERR_BAD_CHUNK_BYTES'
  constructor(
    readonly chunks: Array<{ digest: string; reason: string }>,
    options?: { cause?: unknown }
  ) {
    super(
      `bad bytes for ${chunks.length === 1 ? `chunk ${chunks[0]!.digest}` : `${chunks.length} chunks`}: ${chunks[0]?.reason}`,
      options
    )
  }
}
