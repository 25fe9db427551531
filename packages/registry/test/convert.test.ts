import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { gunzipSync, gzipSync } from 'node:zlib'
import { type FaultProxy, startFaultProxy } from '@test/fault-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { oracle, oraclePath, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  convertImage,
  createRegistryClient,
  type ImageManifest,
  MediaType,
  openImageRepo,
  type RegistryClient
} from '../src/index.js'
import { sha } from './image.js'

const TOC = 'containerd.io/snapshot/stargz/toc.digest'
const USIZE = 'io.containers.estargz.uncompressed-size'
const exec = promisify(execFile)

let reg: TestRegistry
let proxy: FaultProxy
let client: RegistryClient
let dir: string
const big = randomBytes(3 * 1024 * 1024 + 123)

async function rejection(p: Promise<unknown>): Promise<Error & { hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { hint?: string }
  }
  throw new Error('expected a rejection')
}

/** A docker schema 2 image of two real tar.gz layers: the upper one has a whiteout and an opaque directory. */
async function pushSource(ref: string, architectures: string[] = ['amd64']): Promise<void> {
  const l0 = join(dir, 'l0')
  const l1 = join(dir, 'l1')
  await mkdir(join(l0, 'etc'), { recursive: true })
  await mkdir(join(l0, 'usr/bin'), { recursive: true })
  await mkdir(join(l0, 'opq'), { recursive: true })
  await mkdir(join(l0, 'gone'), { recursive: true })
  await writeFile(join(l0, 'etc/a.txt'), 'hello v1\n')
  await writeFile(join(l0, 'usr/bin/big'), big)
  await writeFile(join(l0, 'opq/old.txt'), 'old\n')
  await writeFile(join(l0, 'gone/rm.txt'), 'remove me\n')
  await symlink('etc/a.txt', join(l0, 'link')).catch(() => {})
  await mkdir(join(l1, 'etc'), { recursive: true })
  await mkdir(join(l1, 'gone'), { recursive: true })
  await mkdir(join(l1, 'opq'), { recursive: true })
  await mkdir(join(l1, 'app'), { recursive: true })
  await writeFile(join(l1, 'etc/a.txt'), 'hello v2\n')
  await writeFile(join(l1, 'gone/.wh.rm.txt'), '')
  await writeFile(join(l1, 'opq/.wh..wh..opq'), '')
  await writeFile(join(l1, 'opq/new.txt'), 'new\n')
  await writeFile(join(l1, 'app/start.sh'), '#!/bin/sh\necho start\n')
  const layers: { gz: Buffer; diffId: string }[] = []
  for (const d of [l0, l1]) {
    const tarPath = `${d}.tar`
    await run('tar', ['-C', d, '--sort=name', '--owner=0', '--group=0', '-cf', tarPath, '.'])
    const tar = await readFile(tarPath)
    layers.push({ gz: gzipSync(tar), diffId: sha(tar) })
  }
  for (const l of layers) await client.pushBlob(ref, sha(l.gz), l.gz)
  const manifests = []
  for (const architecture of architectures) {
    const config = Buffer.from(
      JSON.stringify({
        architecture,
        os: 'linux',
        config: { Cmd: ['/app/start.sh'] },
        rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) }
      })
    )
    await client.pushBlob(ref, sha(config), config)
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MediaType.dockerManifest,
        config: { mediaType: MediaType.dockerConfig, digest: sha(config), size: config.length },
        layers: layers.map((l) => ({ mediaType: MediaType.dockerLayerGzip, digest: sha(l.gz), size: l.gz.length }))
      })
    )
    const digest = await client.putManifest(
      architectures.length === 1 ? ref : ref.replace(/:[^:/]+$/, `:${architecture}`),
      manifest,
      MediaType.dockerManifest
    )
    manifests.push({
      mediaType: MediaType.dockerManifest,
      digest,
      size: manifest.length,
      platform: { os: 'linux', architecture }
    })
  }
  if (architectures.length > 1) {
    const list = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.dockerManifestList, manifests }))
    await client.putManifest(ref, list, MediaType.dockerManifestList)
  }
}

/** The blobs of an OCI layout's image manifest, as the reference implementation sees them. */
async function checkLayout(
  layout: string,
  manifestDigest: string
): Promise<{ layers: string[]; manifest: ImageManifest }> {
  const blob = (d: string) => join(layout, 'blobs/sha256', d.slice(7))
  const manifest = JSON.parse(await readFile(blob(manifestDigest), 'utf8')) as ImageManifest
  const config = JSON.parse(await readFile(blob(manifest.config.digest), 'utf8')) as { rootfs: { diff_ids: string[] } }
  const layers: string[] = []
  for (const [i, l] of manifest.layers.entries()) {
    expect(l.mediaType).toBe(MediaType.ociLayerGzip)
    const toc = l.annotations?.[TOC]
    expect(toc).toMatch(/^sha256:[a-f0-9]{64}$/)
    const v = await oracle(['verify', blob(l.digest), '--toc-digest', toc!])
    expect(v.result).toBe('OK')
    // The DiffID is the digest of the whole uncompressed eStargz stream (TOC entry and landmark included).
    const tar = gunzipSync(await readFile(blob(l.digest)))
    expect(sha(tar)).toBe(config.rootfs.diff_ids[i])
    expect(Number(l.annotations?.[USIZE])).toBe(tar.length)
    layers.push(blob(l.digest))
  }
  return { layers, manifest }
}

async function cat(blob: string, path: string): Promise<Buffer> {
  const { stdout } = await exec(oraclePath(), ['cat', blob, path], { encoding: 'buffer', maxBuffer: 1 << 28 })
  return stdout
}

beforeAll(async () => {
  reg = await startRegistry()
  proxy = await startFaultProxy(reg.host)
  client = createRegistryClient({ dockerConfig: false })
  dir = await mkdtemp(join(tmpdir(), 'strata-convert-test-'))
  await pushSource(`${reg.host}/src/app:1`)
})

afterAll(async () => {
  await proxy?.stop()
  await reg?.stop()
  await rm(dir, { recursive: true, force: true })
})

describe('convertImage', () => {
  it('converts every layer; skopeo copies the result; the reference verifies each layer and reads the files', async () => {
    const events: string[] = []
    const result = await convertImage(
      openImageRepo(`${reg.host}/src/app:1`, client),
      openImageRepo(`${reg.host}/dst/app:esgz`, client),
      {
        chunkSize: 1024 * 1024,
        prioritizedFiles: ['app/start.sh', '/etc/a.txt', 'usr/bin/big'],
        onEvent: (e) => events.push(e.type)
      }
    )
    expect(result.mediaType).toBe(MediaType.ociManifest)
    expect(result.images).toHaveLength(1)
    const layers = result.images[0]!.layers
    expect(layers.map((l) => l.converted)).toEqual([true, true])
    // Each prioritized file goes to the topmost layer that has it.
    expect(layers[0]!.prioritizedFiles).toEqual(['usr/bin/big'])
    expect(layers[1]!.prioritizedFiles).toEqual(['app/start.sh', 'etc/a.txt'])
    expect(events).toContain('convert')
    expect(events.indexOf('write')).toBeGreaterThan(events.lastIndexOf('layer'))

    const layout = join(dir, 'oci')
    await run('skopeo', ['copy', '--src-tls-verify=false', `docker://${reg.host}/dst/app:esgz`, `oci:${layout}:esgz`])
    const index = JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')) as { manifests: { digest: string }[] }
    expect(index.manifests[0]!.digest).toBe(result.digest)
    const { layers: blobs } = await checkLayout(layout, result.digest)
    expect((await cat(blobs[0]!, 'usr/bin/big')).equals(big)).toBe(true)
    expect((await cat(blobs[0]!, 'gone/rm.txt')).toString()).toBe('remove me\n')
    expect((await cat(blobs[1]!, 'etc/a.txt')).toString()).toBe('hello v2\n')
    expect((await cat(blobs[1]!, 'opq/new.txt')).toString()).toBe('new\n')
    const toc = JSON.parse((await run(oraclePath(), ['toc', blobs[1]!])).stdout) as {
      entries: { name: string; type: string }[]
    }
    const names = toc.entries.map((e) => e.name.replace(/^\.\//, '').replace(/\/$/, ''))
    expect(names).toContain('gone/.wh.rm.txt')
    expect(names).toContain('opq/.wh..wh..opq')
    const landmark = names.indexOf('.prefetch.landmark')
    expect(landmark).toBeGreaterThan(names.indexOf('app/start.sh'))
    expect(landmark).toBeGreaterThan(names.indexOf('etc/a.txt'))
    expect(landmark).toBeLessThan(names.indexOf('opq/new.txt'))
  })

  it('keeps layers that are eStargz already', async () => {
    const again = await convertImage(
      openImageRepo(`${reg.host}/dst/app:esgz`, client),
      openImageRepo(`${reg.host}/dst/app:again`, client)
    )
    const first = await client.getImage(`${reg.host}/dst/app:esgz`)
    expect(again.images[0]!.layers.map((l) => l.converted)).toEqual([false, false])
    expect(again.images[0]!.layers.map((l) => l.digest)).toEqual(first.layers.map((l) => l.digest))
    expect(again.digest).toBe(first.digest)

    // The same eStargz blobs under a manifest that lost the annotations: found by their footer, kept, annotated.
    const bare = Buffer.from(
      JSON.stringify({ ...first.manifest, layers: first.layers.map(({ annotations: _, ...l }) => l) })
    )
    await client.putManifest(`${reg.host}/dst/app:bare`, bare, MediaType.ociManifest)
    const kept = await convertImage(
      openImageRepo(`${reg.host}/dst/app:bare`, client),
      openImageRepo(`${reg.host}/dst/app:annotated`, client)
    )
    expect(kept.images[0]!.layers.map((l) => l.converted)).toEqual([false, false])
    const annotated = await client.getImage(`${reg.host}/dst/app:annotated`)
    expect(annotated.layers).toEqual(first.layers)
  })

  it('converts every platform of an index, each shared layer once, into an OCI layout', async () => {
    await pushSource(`${reg.host}/src/multi:all`, ['amd64', 'arm64'])
    let builds = 0
    const result = await convertImage(
      openImageRepo(`${reg.host}/src/multi:all`, client),
      openImageRepo(`oci:${join(dir, 'multi')}:esgz`, client),
      { onEvent: (e) => (builds += e.type === 'convert-start' ? 1 : 0) }
    )
    expect(result.mediaType).toBe(MediaType.ociIndex)
    expect(result.images.map((i) => i.platform)).toEqual(['linux/amd64', 'linux/arm64'])
    expect(builds).toBe(2)
    expect(result.images[0]!.layers.map((l) => l.digest)).toEqual(result.images[1]!.layers.map((l) => l.digest))
    const index = JSON.parse(await readFile(join(dir, 'multi/index.json'), 'utf8')) as {
      manifests: { digest: string; annotations: Record<string, string> }[]
    }
    expect(index.manifests).toEqual([
      expect.objectContaining({ digest: result.digest, annotations: { 'org.opencontainers.image.ref.name': 'esgz' } })
    ])
    for (const img of result.images) await checkLayout(join(dir, 'multi'), img.digest)

    // Back from the OCI layout into a registry: every layer is eStargz now, so the same index comes out.
    const back = await convertImage(
      openImageRepo(`oci:${join(dir, 'multi')}:esgz`, client),
      openImageRepo(`${reg.host}/dst/from-oci:1`, client)
    )
    expect(back.images.flatMap((i) => i.layers).every((l) => !l.converted)).toBe(true)
    expect(back.digest).toBe(result.digest)
    expect((await client.getManifest(`${reg.host}/dst/from-oci:1`)).digest).toBe(result.digest)
    const missingTag = await rejection(
      convertImage(
        openImageRepo(`oci:${join(dir, 'multi')}:nope`, client),
        openImageRepo(`${reg.host}/dst/x:1`, client)
      )
    )
    expect(missingTag.name).toBe('ManifestUnknownError')
    expect(missingTag.message).toContain("no image tagged 'nope'")

    const one = await convertImage(
      openImageRepo(`${reg.host}/src/multi:all`, client),
      openImageRepo(`${reg.host}/dst/multi:arm`, client),
      { platform: 'linux/arm64' }
    )
    expect(one.mediaType).toBe(MediaType.ociManifest)
    expect(one.digest).toBe(result.images[1]!.digest)
  })

  it('writes nothing to the destination when the input is bad', async () => {
    const e1 = await rejection(
      convertImage(openImageRepo(`${reg.host}/src/app:1`, client), openImageRepo(`${reg.host}/dst/bad:1`, client), {
        prioritizedFiles: ['gone/rm.txt']
      })
    )
    expect(e1.name).toBe('PrioritizedFileMissingError')
    expect(e1.message).toMatch(/deleted by layer 1/)
    const e2 = await rejection(
      convertImage(openImageRepo(`${reg.host}/src/app:1`, client), openImageRepo(`${reg.host}/dst/bad:1`, client), {
        prioritizedFiles: ['no/such/file']
      })
    )
    expect(e2.name).toBe('PrioritizedFileMissingError')

    const src = await client.getImage(`${reg.host}/src/app:1`)
    proxy.faults.push({
      kind: 'body',
      path: src.layers[1]!.digest,
      method: 'GET',
      body: gzipSync(Buffer.from('not the layer')),
      times: 10
    })
    const e3 = await rejection(
      convertImage(openImageRepo(`${proxy.host}/src/app:1`, client), openImageRepo(`${reg.host}/dst/bad:1`, client))
    )
    expect(e3.name).toBe('DigestMismatchError')
    expect(e3.message).toContain(src.layers[1]!.digest)
    proxy.faults.length = 0

    const zstd = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MediaType.ociManifest,
        config: src.config,
        layers: [{ ...src.layers[0]!, mediaType: MediaType.ociLayerZstd }, src.layers[1]]
      })
    )
    await client.putManifest(`${reg.host}/src/app:zstd`, zstd, MediaType.ociManifest)
    const e4 = await rejection(
      convertImage(openImageRepo(`${reg.host}/src/app:zstd`, client), openImageRepo(`${reg.host}/dst/bad:1`, client))
    )
    expect(e4.name).toBe('LayerNotConvertibleError')
    expect(e4.message).toContain('tar+zstd')

    expect((await rejection(client.getManifest(`${reg.host}/dst/bad:1`))).name).toMatch(
      /ManifestUnknownError|NameUnknownError/
    )
  })
})
