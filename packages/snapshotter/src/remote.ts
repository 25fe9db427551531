// Remote layers: when containerd's Prepare labels name the image and the layer, the layer is not unpacked.
// Two label families do: CRI's (also the 2.x transfer service; nerdctl) and stargz-snapshotter's (ctr-remote).
// The image is opened through p2pd (TOCs by Range, or a whole download indexed for layers that are not
// eStargz), and the layer's place in it is checked against the chain ID containerd wants the snapshot to have:
// the chain of layers 0..i computed from the image config's diff IDs.

import { type AbortOptions, StrataError, sha256Digest } from '@strata/base'
import type { Image } from '@strata/fetcher'
import { parseReference, withDigest } from '@strata/registry'
import type { RemoteLayer } from './state.js'

/** The target snapshot's name (its chain ID), set by containerd's unpacker on every layer's Prepare. */
export const SNAPSHOT_REF_LABEL = 'containerd.io/snapshot.ref'
/** Set on the snapshots strata serves from a merged-root mount instead of unpacking. */
export const REMOTE_LABEL = 'containerd.io/snapshot/strata.remote'

export const CRI_LABELS = {
  imageRef: 'containerd.io/snapshot/cri.image-ref',
  layerDigest: 'containerd.io/snapshot/cri.layer-digest',
  manifestDigest: 'containerd.io/snapshot/cri.manifest-digest',
  imageLayers: 'containerd.io/snapshot/cri.image-layers'
} as const

export const STARGZ_LABELS = {
  reference: 'containerd.io/snapshot/remote/stargz.reference',
  digest: 'containerd.io/snapshot/remote/stargz.digest',
  layers: 'containerd.io/snapshot/remote/stargz.layers'
} as const

/** What Prepare's labels say about the layer, when they say enough to serve it remotely. */
export interface RemoteRequest {
  /** The chain ID the snapshot must be named. */
  target: string
  ref: string
  layer: string
  manifest?: string
}

export function remoteRequest(labels: Record<string, string>): RemoteRequest | undefined {
  const target = labels[SNAPSHOT_REF_LABEL]
  if (target === undefined || target === '') return undefined
  const cri = { ref: labels[CRI_LABELS.imageRef], layer: labels[CRI_LABELS.layerDigest] }
  if (cri.ref !== undefined && cri.layer !== undefined && cri.ref !== '' && cri.layer !== '') {
    const manifest = labels[CRI_LABELS.manifestDigest]
    return { target, ref: cri.ref, layer: cri.layer, ...(manifest !== undefined && manifest !== '' && { manifest }) }
  }
  const ref = labels[STARGZ_LABELS.reference]
  const layer = labels[STARGZ_LABELS.digest]
  if (ref !== undefined && layer !== undefined && ref !== '' && layer !== '') return { target, ref, layer }
  return undefined
}

/** Chain IDs of a stack of diff IDs: chain(0) = diff(0), chain(i) = sha256(chain(i-1) + ' ' + diff(i)). */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = []
  for (const diff of diffIds) {
    const prev = out[out.length - 1]
    out.push(prev === undefined ? diff : sha256Digest(`${prev} ${diff}`))
  }
  return out
}

/** What the resolver reads through: p2pd's node (openImage) and the registry (the image config). */
export interface ImageOpener {
  openImage(ref: string, options?: AbortOptions): Promise<Image>
  fetchBlob(ref: string, digest: string, options?: AbortOptions): Promise<Uint8Array>
}

/** Why a layer is unpacked after all: said in p2pd's log, never to containerd (the pull must go on). */
export class NotRemoteError extends StrataError {
  override name = 'NotRemoteError'
}

interface Opened {
  image: Image
  chain: string[]
  ref: string
}

/**
 * Resolves Prepare requests to remote layers. Images are remembered by reference for a short while: a pull
 * prepares its layers one after another, and each must not cost a manifest and a config again.
 */
export class RemoteResolver {
  readonly #opened = new Map<string, { at: number; opening: Promise<Opened> }>()

  constructor(
    private readonly opener: ImageOpener,
    private readonly rememberMs = 60_000
  ) {}

  /**
   * The remote layer `req` names, checked: the layer is in the image, the snapshot's chain ID is the chain of
   * the image's layers up to it, and the parent is the chain below it. NotRemoteError otherwise.
   */
  async resolve(req: RemoteRequest, parentChain: string | undefined, options?: AbortOptions): Promise<RemoteLayer> {
    const { image, chain, ref } = await this.#open(req, options)
    const index = image.layers.findIndex((l) => l.digest === req.layer)
    if (index < 0) throw new NotRemoteError(`layer ${req.layer} is not in ${ref}`)
    if (chain[index] !== req.target) {
      throw new NotRemoteError(
        `layer ${index} of ${ref} has chain ID ${chain[index]}, containerd asked for ${req.target}`
      )
    }
    const below = index > 0 ? chain[index - 1] : undefined
    if (below !== parentChain) {
      throw new NotRemoteError(
        `the parent snapshot is ${parentChain ?? 'none'}, but layer ${index} of ${ref} sits on ${below ?? 'nothing'}`
      )
    }
    const layer = image.layers[index]!
    let size = 0
    for (const e of layer.toc.entries.values()) if (e.type === 'reg') size += e.size
    return { ref, manifest: image.digest, layer: req.layer, index, size, inodes: layer.toc.entries.size }
  }

  #open(req: RemoteRequest, options?: AbortOptions): Promise<Opened> {
    // Pinned to the manifest containerd pulled when it says which; a tag could have moved since.
    const ref = req.manifest !== undefined ? String(withDigest(parseReference(req.ref), req.manifest)) : req.ref
    const now = Date.now()
    for (const [k, v] of this.#opened) if (now - v.at > this.rememberMs) this.#opened.delete(k)
    const known = this.#opened.get(ref)
    if (known !== undefined) return known.opening
    const opening = (async (): Promise<Opened> => {
      const image = await this.opener.openImage(ref, options)
      if (req.manifest !== undefined && image.digest !== req.manifest) {
        throw new NotRemoteError(`${ref} opened as manifest ${image.digest}`)
      }
      const config = JSON.parse(
        new TextDecoder().decode(await this.opener.fetchBlob(ref, image.config.digest, options))
      ) as { rootfs?: { diff_ids?: unknown } }
      const diffIds = config.rootfs?.diff_ids
      if (!Array.isArray(diffIds) || !diffIds.every((d) => typeof d === 'string')) {
        throw new NotRemoteError(`the config of ${ref} has no rootfs.diff_ids`)
      }
      if (diffIds.length !== image.layers.length) {
        throw new NotRemoteError(`${ref} has ${image.layers.length} layers but ${diffIds.length} diff IDs`)
      }
      // Later references to the image go by its digest: what it is now is what the snapshot holds.
      return { image, chain: chainIds(diffIds), ref: String(withDigest(parseReference(ref), image.digest)) }
    })()
    this.#opened.set(ref, { at: now, opening })
    opening.catch(() => this.#opened.delete(ref))
    return opening
  }
}
