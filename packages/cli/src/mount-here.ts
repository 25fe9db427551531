import { join } from 'node:path'
import { createFetcher, createRegistrySource, type FetchEvent, openImage, resolveImage } from '@strata/fetcher'
import { type ReadFailure, serveMount } from '@strata/fs'
import { createRegistryClient, parseReference, type RegistryClient } from '@strata/registry'
import { openDiskStore } from '@strata/store'
import type { Context } from './command.js'
import { parseCredentials } from './credentials.js'
import { formatBytes, Progress } from './output.js'
import { writableDir } from './writable-dir.js'

/** What p2p-mount mounts, with its paths resolved. */
export interface EmbeddedMount {
  image: string
  mountpoint: string
  /** The mountpoint as the user gave it, for the `mounted IMAGE at MOUNTPOINT` line. */
  shown: string
  dataDir: string
  recordFile?: string | undefined
}

/** Embedded mode: this process owns the store and serves the mount itself. */
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
    const stale = (e: FetchEvent) => {
      if (e.type === 'image:stale') out.warn(e.message)
    }
    const pinned = await resolveImage({ client, store, ref: image, platform, pending, signal, onProgress: stale })
    const layerIndex = new Map(pinned.layers.map((l, i) => [l.digest, i]))
    const tocs = new Progress(out.stderr, `opening ${image}`, pinned.layers.length, false)
    const downloading = new Set<string>()
    const onProgress = (e: FetchEvent) => {
      if (e.type === 'layer:toc') tocs.add(1)
      else if (e.type === 'layer:unverified') out.warn(e.message)
      else if (e.type === 'layer:download' && !downloading.has(e.layer)) {
        downloading.add(e.layer)
        out.info(`layer ${layerIndex.get(e.layer)} is not eStargz: fetching it whole (${formatBytes(e.total)})`)
      }
    }
    const opened = await openImage({
      client,
      store,
      ref: pinned.ref,
      image: pinned,
      requireVerified: ctx.opts['require-verified'] === true,
      signal,
      onProgress
    })
    tocs.finish(`opened ${image}: ${opened.layers.length} layers`)

    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client, ref: pinned.ref, layers: opened.layers })]
    })
    let writable: string | undefined
    if (ctx.opts.writable === true) writable = await writableDir(dir, mountpoint, opened.digest)
    const onError = (f: ReadFailure) =>
      out.warn(`read of ${f.path} (layer ${f.layer}, ${f.length} bytes at ${f.offset}) failed: ${f.error.message}`)
    const served = await serveMount(
      {
        image: opened,
        fetcher,
        mountpoint,
        onError,
        ...(writable !== undefined && { writableDir: writable }),
        ...(recordFile !== undefined && { recordFile })
      },
      { signal }
    )
    try {
      out.print(`mounted ${image} at ${what.shown}`)
      // The prioritized files of eStargz layers, in the background: the workload will want them first.
      const prioritized = opened.layers.reduce((n, l) => n + l.toc.prioritized.reduce((m, e) => m + e.size, 0), 0)
      if (prioritized > 0) {
        const started = Date.now()
        fetcher.prefetch(opened, { signal }).then(
          () =>
            out.info(
              `prefetched the prioritized files (${formatBytes(prioritized)}) in ${((Date.now() - started) / 1000).toFixed(1)}s`
            ),
          (err: Error) => {
            if (!signal.aborted) out.warn(`prefetch of ${image} failed: ${err.message}`)
          }
        )
      }
      await new Promise<void>((done) => {
        if (signal.aborted) done()
        else signal.addEventListener('abort', () => done(), { once: true })
      })
    } finally {
      await served.unmount()
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
