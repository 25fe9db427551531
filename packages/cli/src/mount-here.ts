import { join } from 'node:path'
import { createFetcher, createRegistrySource, type FetchEvent, openImage, resolveImage } from '@strata/fetcher'
import { thisProcess } from '@strata/fs'
import { createMounts, type ImageSource } from '@strata/mounts'
import { createRegistryClient, parseReference, type RegistryClient } from '@strata/registry'
import { openDiskStore } from '@strata/store'
import type { Context } from './command.js'
import { parseCredentials } from './credentials.js'
import { formatBytes, Progress } from './output.js'

/** What p2p-mount mounts, with its paths resolved. */
export interface EmbeddedMount {
  image: string
  mountpoint: string
  /** The mountpoint as the user gave it, for the `mounted IMAGE at MOUNTPOINT` line. */
  shown: string
  dataDir: string
  recordFile?: string | undefined
}

/**
 * Embedded mode: this process owns the store and serves the mount itself, through the same Mounts service as
 * p2pd (@strata/mounts), with a fetcher of its own store and the registry. This file opens and prints.
 */
export async function mountHere(ctx: Context, what: EmbeddedMount): Promise<number> {
  const { image, mountpoint, recordFile, dataDir: dir } = what
  const { signal, out } = ctx
  const client = registryClient(ctx, image)

  // The store opens while the manifest is on its way.
  const platform = ctx.opts.platform as string | undefined
  const pending = client.getImage(image, { platform, signal })
  pending.catch(() => {})
  const store = await openDiskStore(join(dir, 'store'))
  try {
    let tocs: Progress | undefined
    const source: ImageSource = {
      fetcher: createFetcher({ store, sources: [createRegistrySource({ client })] }),
      async openImage(ref, options) {
        // Said as it comes, before the TOCs' progress (the service would say it once the image is open).
        const stale = (e: FetchEvent) => {
          if (e.type === 'image:stale') out.warn(e.message)
        }
        const pinned = await resolveImage({ client, store, ref, platform, pending, signal, onProgress: stale })
        const layerIndex = new Map(pinned.layers.map((l, i) => [l.digest, i]))
        const downloading = new Set<string>()
        tocs = new Progress(out.stderr, `opening ${image}`, pinned.layers.length, false)
        const onProgress = (e: FetchEvent) => {
          if (e.type === 'layer:toc') tocs?.add(1)
          else if (e.type === 'layer:unverified') out.warn(e.message)
          else if (e.type === 'layer:download' && !downloading.has(e.layer)) {
            downloading.add(e.layer)
            out.info(`layer ${layerIndex.get(e.layer)} is not eStargz: fetching it whole (${formatBytes(e.total)})`)
          }
        }
        return openImage({
          client,
          store,
          ref: pinned.ref,
          image: pinned,
          requireVerified: ctx.opts['require-verified'] === true,
          signal: options?.signal ?? signal,
          onProgress
        })
      }
    }
    // No holder: the mount lives as long as this process. The prioritized files are fetched once mounted.
    const mounts = createMounts({ source, dataDir: dir, prefetch: true })
    const request = {
      image,
      mountpoint,
      ...(ctx.opts.writable === true && { writable: true }),
      ...(recordFile !== undefined && { record: recordFile })
    }
    for await (const e of mounts.mount(request, thisProcess(), { signal })) {
      if (e.type === 'opened') tocs?.finish(`opened ${image}: ${e.layers} layers`)
      else if (e.type === 'mounted') out.print(`mounted ${image} at ${what.shown}`)
      else if (e.type === 'warning') out.warn(e.message)
      else if (e.type === 'read-error') {
        const f = e.failure
        out.warn(`read of ${f.path} (layer ${f.layer}, ${f.length} bytes at ${f.offset}) failed: ${f.error.message}`)
      } else if (e.type === 'prefetched') {
        out.info(`prefetched the prioritized files (${formatBytes(e.bytes)}) in ${(e.ms / 1000).toFixed(1)}s`)
      } else if (e.type === 'prefetch-failed') out.warn(`prefetch of ${image} failed: ${e.message}`)
    }
    out.info(`unmounted ${mountpoint}${recordFile !== undefined ? `; recorded reads in ${recordFile}` : ''}`)
    return 0
  } finally {
    await store.close()
  }
}

function registryClient(ctx: Context, image: string): RegistryClient {
  // p2p-mount checked the reference before.
  const { registry } = parseReference(image)
  const insecure = (ctx.opts['insecure-registry'] as string[] | undefined) ?? []
  const credentials = parseCredentials((ctx.opts.creds as string[] | undefined) ?? [], [registry])
  return createRegistryClient({ insecure, credentials })
}
