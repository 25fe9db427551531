import { join } from 'node:path'
import { createFetcher, createRegistrySource, openImage, resolveImage } from '@strata/fetcher'
import { thisProcess } from '@strata/fs'
import { createMounts, type ImageSource, type OpenProgress } from '@strata/mounts'
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
 * p2pd (@strata/mounts), with a fetcher of its own store and the registry. This file says how to open an image
 * here, and prints.
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
    // Opens, and says how it goes; the Mounts service passes it on as `progress` events.
    const source: ImageSource = {
      fetcher: createFetcher({ store, sources: [createRegistrySource({ client })] }),
      async openImage(ref, options) {
        const onProgress = options?.onProgress
        const opts = { signal: options?.signal ?? signal, ...(onProgress !== undefined && { onProgress }) }
        const pinned = await resolveImage({ client, store, ref, platform, pending, ...opts })
        onProgress?.({ type: 'image:resolved', ref, layers: pinned.layers.map((l) => l.digest) })
        const requireVerified = ctx.opts['require-verified'] === true
        return openImage({ client, store, ref: pinned.ref, image: pinned, requireVerified, ...opts })
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
    const opening = openingOutput(ctx, image)
    for await (const e of mounts.mount(request, thisProcess(), { signal })) {
      if (e.type === 'progress') opening.progress(e.event)
      else if (e.type === 'opened') opening.opened(e.layers)
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

/** What opening the image prints: stale and unverified warnings, the TOCs' progress, whole downloads. */
function openingOutput(ctx: Context, image: string) {
  const { out } = ctx
  let tocs: Progress | undefined
  let layerIndex = new Map<string, number>()
  const downloading = new Set<string>()
  return {
    progress(e: OpenProgress) {
      if (e.type === 'image:resolved') {
        layerIndex = new Map(e.layers.map((digest, i) => [digest, i]))
        tocs = new Progress(out.stderr, `opening ${image}`, e.layers.length, false)
      } else if (e.type === 'image:stale' || e.type === 'layer:unverified') out.warn(e.message)
      else if (e.type === 'layer:toc') tocs?.add(1)
      else if (e.type === 'layer:download' && !downloading.has(e.layer)) {
        downloading.add(e.layer)
        out.info(`layer ${layerIndex.get(e.layer)} is not eStargz: fetching it whole (${formatBytes(e.total)})`)
      }
    },
    opened(layers: number) {
      tocs?.finish(`opened ${image}: ${layers} layers`)
    }
  }
}

function registryClient(ctx: Context, image: string): RegistryClient {
  // p2p-mount checked the reference before.
  const { registry } = parseReference(image)
  const insecure = (ctx.opts['insecure-registry'] as string[] | undefined) ?? []
  const credentials = parseCredentials((ctx.opts.creds as string[] | undefined) ?? [], [registry])
  return createRegistryClient({ insecure, credentials })
}
