// The fs fixture's layers (test/fs/fixture.ts) as an opened image, for tests of mounting: an ImageSource that
// reads the blob files, and fails reads of the paths it is told to.
import { spawn } from 'node:child_process'
import type { Image } from '@strata/fetcher'
import { type FileReadAt, fileReader, type Layer, openLayer, readFileRange, type TOC } from '@strata/stargz'
import { makeFixture } from '../../../test/fs/fixture.js'
import type { ImageSource } from '../src/index.js'

export const IMAGE = 'localhost:5000/fixture:1'
export const DIGEST = `sha256:${'d'.repeat(64)}`

export interface SourceOptions {
  /** Opening says the registry could not be reached, with this message. */
  stale?: string
  /** Paths (TOC style, `data/n1`) whose reads fail. */
  failing?: Set<string>
  /** A file of layer 0 to list as its one prioritized file. */
  prioritized?: string
  /** Opening says how it goes, as embedded p2p-mount's does: the manifest resolved, then each layer's TOC. */
  progress?: boolean
}

export interface FixtureImage {
  source(options?: SourceOptions): ImageSource
  close(): Promise<void>
}

/** Builds the fixture in `work` (a few seconds: three layers through the eStargz oracle). */
export async function openFixture(work: string): Promise<FixtureImage> {
  const fixture = await makeFixture(work)
  const readers: FileReadAt[] = await Promise.all(fixture.blobs.map((b) => fileReader(b.path)))
  const layers: Layer[] = await Promise.all(
    readers.map((r, i) => openLayer(r, { tocDigest: fixture.blobs[i]!.tocDigest }))
  )
  return {
    source(options = {}) {
      const image = {
        ref: IMAGE,
        digest: DIGEST,
        layers: layers.map((l, i) => ({
          ...l,
          digest: `sha256:${String(i).repeat(64)}`,
          verified: true,
          ...(i === 0 && options.prioritized !== undefined && { toc: prioritize(l.toc, options.prioritized) })
        }))
      } as unknown as Image
      return {
        async openImage(ref, opts) {
          if (options.stale !== undefined) opts?.onStale?.(options.stale)
          if (options.progress === true) {
            opts?.onProgress?.({ type: 'image:resolved', ref, layers: image.layers.map((l) => l.digest) })
            for (const l of image.layers) {
              // One at a time, as TOCs arrive.
              await new Promise((resolve) => setImmediate(resolve))
              opts?.onProgress?.({ type: 'layer:toc', layer: l.digest, format: 'estargz', cached: false })
            }
          }
          return image
        },
        fetcher: {
          async readRange(layer, entry, offset, into, opts) {
            if (options.failing?.has(entry.path)) throw new Error(`no bytes for ${entry.path}`)
            const i = image.layers.indexOf(layer)
            const bytes = await readFileRange(readers[i]!, layers[i]!, entry, offset, into.length, opts)
            into.set(bytes)
            return bytes.length
          },
          prefetch: async () => {}
        }
      }
    },
    close: async () => {
      await Promise.all(readers.map((r) => r.close()))
    }
  }
}

/** The TOC with `path` as its one prioritized file. */
function prioritize(toc: TOC, path: string): TOC {
  const entry = toc.lookup(path)!
  return new Proxy(toc, {
    get(t, key) {
      if (key === 'prioritized') return [entry]
      const v = Reflect.get(t, key, t)
      return typeof v === 'function' ? v.bind(t) : v
    }
  })
}

/** `cat PATH` in a child process (this process serves the mount: reading it here could wait on itself). */
export function cat(path: string): Promise<{ code: number | null; stdout: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('cat', [path], { stdio: ['ignore', 'pipe', 'ignore'] })
    let stdout = ''
    child.stdout.on('data', (d) => {
      stdout += d
    })
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout }))
  })
}
