import { type AbortOptions, META } from '@strata/base'
import { type Image, openImage, resolveImage } from '@strata/fetcher'
import { parseReference, type RegistryClient } from '@strata/registry'
import type { ChunkStore } from '@strata/store'
import { RegistryNotAllowedError } from './errors.js'

/**
 * The node's image catalog: the images it has opened (manifest, verified TOCs, merged tree), kept in memory
 * within bounds, the registries peers may have it read from, and the record of the images warmed here.
 */

/** An image warmed on this node (`p2pctl images`). */
export interface ImageRecord {
  ref: string
  digest: string
  layers: string[]
  chunks: number
  bytes: number
  warmedAt: string
}

export interface OpenImageOptions extends AbortOptions {
  /** The registry could not be reached and the image `ref` named before is used: why, for the operator. */
  onStale?: (message: string) => void
}

export interface CatalogInit {
  /**
   * References whose opened image is kept (TOCs and merged tree in memory), least recently opened let go first
   * (default 256): a CI that tags every commit must not grow p2pd forever. A reference let go opens again from
   * the store.
   */
  maxReferences?: number
  /**
   * Files (TOC entries) of the images kept, all together: past it, the least recently opened references are let go
   * too, all but the last (default 200,000, see MAX_OPENED_FILES).
   */
  maxOpenedFiles?: number
  /**
   * Registries (host[:port]) a peer may ask this node to read an image from, besides those a local caller opened
   * an image from. Default: none.
   */
  registries?: readonly string[]
}

export interface CatalogComponents {
  /** Where manifests and TOCs are kept (an image opened before opens again from it, even in an outage). */
  store: ChunkStore
  /** What images are opened with; without one the catalog opens nothing. */
  registry?: RegistryClient
}

export interface Catalog {
  /**
   * The image `ref` names now: its manifest is asked for every time (a tag moves), and an image already opened
   * (by manifest digest) is not opened again. When the registry cannot be reached (an outage, not a refusal), a
   * reference opened before gives the image it named then, and `onStale` hears why.
   *
   * For a local caller (control API, mounts) the reference's registry becomes one peers may name too. For a peer
   * (a forwarded fetch, a warm-up) only such registries: RegistryNotAllowedError otherwise.
   */
  open(ref: string, caller: 'local' | 'peer', options?: OpenImageOptions): Promise<Image>
  /**
   * Whether a peer's request may have this node read `ref` from its registry: only registries this node was
   * configured for or a local caller opened here. A peer must not make it send requests (and credentials) to any
   * host it names, nor fill its disk from one; a peer's request never widens the set.
   */
  mayOpenForPeer(ref: string): boolean
  /** A registry (host[:port]) peers may name from now on (a local caller read from it). */
  allowRegistry(registry: string): void
  /** The reference the layer was first opened from (a home node asked to fetch its chunks opens it by this name). */
  imageOf(layer: string): string | undefined
  /** The images warmed here. */
  images(options?: AbortOptions): Promise<ImageRecord[]>
  /** Keeps the record of an image warmed here (one per reference). */
  record(record: ImageRecord, options?: AbortOptions): Promise<void>
}

const MAX_REFERENCES = 256
/**
 * A TOC and its merged tree cost about 750 bytes a file in memory (380 + 370 measured, 50,000 files): 256 large
 * images kept could take GBs. 200,000 files is about 150 MB, a few large images (a distribution with its
 * toolchains has 50,000-100,000 files). An image mounted keeps its tree while mounted all the same.
 */
const MAX_OPENED_FILES = 200_000

/** The catalog, built like a libp2p service: `catalog(init)(components)`. */
export function catalog(init: CatalogInit = {}): (components: CatalogComponents) => Catalog {
  return (components) => new ImageCatalog(components, init)
}

/** The registry (host[:port]) a reference names; undefined when it is not a valid reference. */
export function registryOf(ref: string): string | undefined {
  try {
    return parseReference(ref).registry
  } catch {
    return undefined
  }
}

class ImageCatalog implements Catalog {
  /** Images opened, by manifest digest: only those some reference names now (see `named`). */
  private readonly opened = new Map<string, Promise<Image>>()
  /** The manifest digest each reference named when last resolved, least recently opened first. */
  private readonly named = new Map<string, string>()
  /** Files (TOC entries) of each image opened, by manifest digest. */
  private readonly files = new Map<string, number>()
  /** The image each opened layer came from. */
  private readonly imageOfLayer = new Map<string, string>()
  private readonly registries: Set<string>
  private readonly maxReferences: number
  private readonly maxOpenedFiles: number

  constructor(
    private readonly components: CatalogComponents,
    init: CatalogInit
  ) {
    this.registries = new Set(init.registries ?? [])
    this.maxReferences = init.maxReferences ?? MAX_REFERENCES
    this.maxOpenedFiles = init.maxOpenedFiles ?? MAX_OPENED_FILES
  }

  mayOpenForPeer(ref: string): boolean {
    const registry = registryOf(ref)
    return registry !== undefined && this.registries.has(registry)
  }

  allowRegistry(registry: string): void {
    this.registries.add(registry)
  }

  imageOf(layer: string): string | undefined {
    return this.imageOfLayer.get(layer)
  }

  async open(ref: string, caller: 'local' | 'peer', options?: OpenImageOptions): Promise<Image> {
    // An invalid reference fails below, with the registry client's own error.
    const registry = registryOf(ref)
    if (caller === 'peer' && !this.mayOpenForPeer(ref)) throw new RegistryNotAllowedError(ref, registry ?? ref)
    if (caller === 'local' && registry !== undefined) this.registries.add(registry)
    const client = this.components.registry
    if (client === undefined) throw new Error(`cannot open ${ref}: this node has no registry client`)
    const { store } = this.components
    const signal = options?.signal
    const manifest = await resolveImage({
      client,
      store,
      ref,
      signal,
      onProgress: (e) => {
        if (e.type === 'image:stale') options?.onStale?.(e.message)
      }
    })
    const digest = manifest.digest
    let opening = this.opened.get(digest)
    if (opening === undefined) {
      opening = openImage({ client, store, ref, image: manifest, signal }).then((image) => {
        for (const layer of image.layers)
          if (!this.imageOfLayer.has(layer.digest)) this.imageOfLayer.set(layer.digest, ref)
        const files = image.layers.reduce((n, l) => n + l.toc.entries.size, 0)
        if (this.opened.get(digest) === opening) this.files.set(digest, files)
        return image
      })
      this.opened.set(digest, opening)
      opening.catch(() => {
        if (this.opened.get(digest) === opening) this.opened.delete(digest)
      })
    }
    const image = await opening
    this.keep(ref, digest)
    return image
  }

  /**
   * The most recently opened references name the images kept: a tag that moved lets go of what it named, and past
   * maxReferences (or maxOpenedFiles) the least recently opened reference goes (each unless another names it).
   */
  private keep(ref: string, digest: string): void {
    const previous = this.named.get(ref)
    this.named.delete(ref)
    this.named.set(ref, digest)
    if (previous !== undefined && previous !== digest) this.letGo(previous)
    if (this.named.size > this.maxReferences) this.letGoOldest()
    while (this.named.size > 1 && [...this.files.values()].reduce((a, b) => a + b, 0) > this.maxOpenedFiles)
      this.letGoOldest()
  }

  private letGoOldest(): void {
    const [oldest, named] = this.named.entries().next().value as [string, string]
    this.named.delete(oldest)
    this.letGo(named)
  }

  /** Forgets the opened image of `digest` unless a reference still names it. */
  private letGo(digest: string): void {
    if ([...this.named.values()].includes(digest)) return
    this.opened.delete(digest)
    this.files.delete(digest)
  }

  async images(options?: AbortOptions): Promise<ImageRecord[]> {
    const saved = await this.components.store.getMeta(META.nodeImages, options)
    return saved === undefined ? [] : (JSON.parse(new TextDecoder().decode(saved)) as ImageRecord[])
  }

  async record(record: ImageRecord, options?: AbortOptions): Promise<void> {
    const images = (await this.images(options)).filter((i) => i.ref !== record.ref)
    images.push(record)
    await this.components.store.putMeta(META.nodeImages, new TextEncoder().encode(JSON.stringify(images)), options)
  }
}
