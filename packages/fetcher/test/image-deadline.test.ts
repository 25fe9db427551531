import { createHash, randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough, Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { createRegistryClient, MediaType, type RegistryClient } from '@strata/registry'
import { buildEstargz } from '@strata/stargz'
import { createMemoryStore } from '@strata/store'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { run } from '@test/tools.js'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { startTrickleProxy, type TrickleProxy } from '../../registry/test/trickle-proxy.js'
import { type FetchEvent, openImage } from '../src/index.js'

const sha = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`

let reg: TestRegistry
let slow: TrickleProxy
let client: RegistryClient
let work: string
/** The eStargz layer's digest, and the plain (tar.gz) layer's. */
let estargzLayer: string
let plainLayer: string

/** Pushes a one-layer OCI image; returns the layer's digest. */
async function pushImage(ref: string, blob: Buffer, diffId: string, annotations?: Record<string, string>) {
  const config = Buffer.from(
    JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [diffId] } })
  )
  await client.pushBlob(ref, sha(blob), blob)
  await client.pushBlob(ref, sha(config), config)
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: MediaType.ociConfig, digest: sha(config), size: config.length },
      layers: [
        {
          mediaType: MediaType.ociLayerGzip,
          digest: sha(blob),
          size: blob.length,
          ...(annotations !== undefined ? { annotations } : {})
        }
      ]
    })
  )
  await client.putManifest(ref, manifest, MediaType.ociManifest)
  return sha(blob)
}

beforeAll(async () => {
  reg = await startRegistry()
  slow = await startTrickleProxy(reg.host, { bytes: 1, everyMs: 100 })
  client = createRegistryClient({ dockerConfig: false, deadlineMs: 1000 })
  work = await mkdtemp(join(tmpdir(), 'strata-image-deadline-'))
  const src = join(work, 'src')
  await mkdir(join(src, 'etc'), { recursive: true })
  await writeFile(join(src, 'etc/hostname'), 'strata\n')
  // Random bytes do not compress: the plain layer is ~20 kB, 2 s at 1 kB per 100 ms.
  await writeFile(join(src, 'random'), randomBytes(20_000))
  await run('tar', ['--sort=name', '--owner=0', '--group=0', '-C', src, '-cf', join(work, 'layer.tar'), '.'])
  const tar = await readFile(join(work, 'layer.tar'))

  const out = new PassThrough()
  const parts: Buffer[] = []
  out.on('data', (d: Buffer) => parts.push(d))
  const built = await buildEstargz(Readable.from([tar]), out, { tmpDir: work })
  estargzLayer = await pushImage(
    `${reg.host}/deadline/estargz:1`,
    Buffer.concat(parts),
    built.diffId,
    built.annotations
  )
  plainLayer = await pushImage(`${reg.host}/deadline/plain:1`, gzipSync(tar), sha(tar))
})

afterEach(() => {
  slow.match = () => false
  slow.bytes = 1
  slow.trickled.length = 0
})

afterAll(async () => {
  await slow?.stop()
  await reg?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

const blobGet = ({ method, path }: { method: string; path: string }) => method === 'GET' && path.includes('/blobs/')

describe('openImage against a registry that trickles its answers', () => {
  it('ends the footer and TOC read at the deadline, naming the layer', { timeout: 15_000 }, async () => {
    slow.match = ({ method, path, range }) => blobGet({ method, path }) && range !== undefined
    const start = performance.now()
    const err = await openImage({ client, store: createMemoryStore(), ref: `${slow.host}/deadline/estargz:1` }).then(
      () => undefined,
      (e: unknown) => e as Error & { hint?: string }
    )
    const ms = performance.now() - start
    expect(err?.name).toBe('RegistryDeadlineExceededError')
    expect(err?.message).toMatch(
      new RegExp(
        `^${slow.host}/deadline/estargz@${estargzLayer}: reading the footer and TOC \\(\\d+ bytes at offset 0\\) took longer than the deadline of 1 s$`
      )
    )
    expect(err?.hint).toMatch(/deadlineMs/)
    expect(ms).toBeLessThan(5000)
  })

  it('uses the image the tag named before when the manifest does not come within the deadline', {
    timeout: 15_000
  }, async () => {
    const store = createMemoryStore()
    const ref = `${slow.host}/deadline/estargz:1`
    const first = await openImage({ client, store, ref })
    slow.match = ({ path }) => path.includes('/manifests/')
    const events: FetchEvent[] = []
    const again = await openImage({ client, store, ref, onProgress: (e) => events.push(e) })
    expect(again.digest).toBe(first.digest)
    const stale = events.find((e) => e.type === 'image:stale')
    expect(stale?.type === 'image:stale' && stale.message).toMatch(
      /reading the manifest of tag 1 took longer than the deadline of 1 s/
    )
  })

  it('puts no deadline on the whole download of a layer that is not eStargz', { timeout: 30_000 }, async () => {
    // The footer probe (a Range read) comes at once; the download of ~20 kB takes 2 s, twice the deadline.
    slow.match = ({ method, path, range }) =>
      blobGet({ method, path }) && range === undefined && path.includes(plainLayer)
    slow.bytes = 1000
    const image = await openImage({ client, store: createMemoryStore(), ref: `${slow.host}/deadline/plain:1` })
    expect(image.layers[0]!.format).toBe('indexed')
    expect(image.layers[0]!.toc.lookup('etc/hostname')).toBeDefined()
    expect(slow.trickled.map((t) => t.aborted)).toEqual([false])
  })
})
