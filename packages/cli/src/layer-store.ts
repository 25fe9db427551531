// p2pd --layer-store DIR: containers-storage's additional layer store (podman) on DIR, served by this node.
// Images open through the node as a local caller's would (their chunks come from the store, peers, the registry);
// the image config (diff IDs) and the bytes of a `blob` file someone reads come from the registry.
import { resolve } from 'node:path'
import { type LayerStore, mountLayerStore } from '@strata/fs'
import type { StrataNode } from '@strata/node'
import type { RegistryClient } from '@strata/registry'

export interface LayerStoreServiceInit {
  dir: string
  node: StrataNode
  registry: RegistryClient
  log: (message: string) => void
}

export function startLayerStore(init: LayerStoreServiceInit): Promise<LayerStore> {
  const { node, registry } = init
  return mountLayerStore({
    // storage.conf names it by an absolute path; so does the ready line.
    mountpoint: resolve(init.dir),
    source: {
      openImage: (ref, options) => node.openImage(ref, options),
      fetchBlob: (ref, digest, options) => registry.fetchBlob(ref, digest, options),
      readBlob: (ref, layer, offset, length, options) =>
        registry.blob(ref, layer.digest, layer.descriptor.size).readAt(offset, length, options),
      fetcher: node.fetcher
    },
    log: init.log,
    onError: (f) => init.log(`layer store: reading ${f.path} failed (the reader got EIO): ${f.error.message}`)
  })
}
