import { randomBytes } from 'node:crypto'
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type FaultProxy, startFaultProxy } from '@test/fault-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createRegistryClient, MediaType, type RegistryClient } from '../src/index.js'
import { pushImage, sha } from './image.js'

let reg: TestRegistry
let proxy: FaultProxy
let client: RegistryClient
let dir: string

beforeAll(async () => {
  reg = await startRegistry()
  proxy = await startFaultProxy(reg.host)
  client = createRegistryClient({ dockerConfig: false })
  dir = await mkdtemp(join(tmpdir(), 'strata-registry-test-'))
})

afterAll(async () => {
  await proxy?.stop()
  await reg?.stop()
  await rm(dir, { recursive: true, force: true })
})

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { code?: string; hint?: string }
  }
  throw new Error('expected a rejection')
}

describe('push and pull against a real registry', () => {
  it('round-trips an image: manifest, config, layers by range and whole', async () => {
    const ref = `${reg.host}/app/round:1`
    const pushed = await pushImage(client, ref, [100_000, 3000])
    const img = await client.getImage(ref)
    expect(img.digest).toBe(pushed.digest)
    expect(img.ref.digest).toBe(pushed.digest)
    expect(img.mediaType).toBe(MediaType.ociManifest)
    expect(Buffer.from(img.manifestBytes).equals(Buffer.from(pushed.manifestBytes))).toBe(true)
    expect(img.layers.map((l) => l.digest)).toEqual(pushed.layers.map(sha))
    const config = await client.fetchBlob(ref, img.config.digest)
    expect(Buffer.from(config).equals(Buffer.from(pushed.config))).toBe(true)

    const layer = pushed.layers[0]!
    const blob = client.blob(ref, img.layers[0]!)
    expect(blob.size).toBe(100_000)
    expect(Buffer.from(await blob.readAt(12_345, 1000)).equals(Buffer.from(layer.subarray(12_345, 13_345)))).toBe(true)
    // Past the end: fewer bytes, only there.
    expect((await blob.readAt(99_990, 100)).length).toBe(10)
    expect((await blob.readAt(100_000, 10)).length).toBe(0)

    const path = join(dir, 'layer0')
    let progress = 0
    await client.downloadBlob(ref, sha(layer), path, { onProgress: (n) => (progress = n) })
    expect(Buffer.from(await readFile(path)).equals(Buffer.from(layer))).toBe(true)
    expect(progress).toBe(100_000)
    expect((await readdir(dir)).filter((n) => n.includes('partial'))).toEqual([])
  })

  it('learns the size of a blob opened without one from its first range answer', async () => {
    const ref = `${reg.host}/app/nosize:1`
    const pushed = await pushImage(client, ref, [5000])
    const blob = client.blob(ref, sha(pushed.layers[0]!))
    expect(Number.isNaN(blob.size)).toBe(true)
    await blob.readAt(0, 10)
    expect(blob.size).toBe(5000)
    expect(await client.blobSize(ref, sha(pushed.layers[0]!))).toBe(5000)
  })

  it("reads each run it is given by its own Range request: coalescing is the caller's (the registry source)", async () => {
    const ref = `${proxy.host}/app/ranges:1`
    const pushed = await pushImage(client, ref, [200_000])
    const layer = pushed.layers[0]!
    const digest = sha(layer)
    const before = proxy.requests.length
    const runs = [
      { offset: 1000, length: 600 },
      { offset: 0, length: 1000 },
      { offset: 150_000, length: 10 },
      { offset: 199_995, length: 100 }
    ]
    const got: Uint8Array[] = []
    await client.blob(ref, digest, layer.length).readRuns(runs, (i, bytes) => {
      got[i] = bytes
    })
    runs.forEach((r, i) => {
      expect(Buffer.from(got[i]!).equals(Buffer.from(layer.subarray(r.offset, r.offset + r.length))), `run ${i}`).toBe(
        true
      )
    })
    // The last run is cut at the end of the blob (its size is known); none is merged with another.
    expect(got[3]!.length).toBe(5)
    const gets = proxy.requests.slice(before).filter((r) => r.method === 'GET')
    expect(gets.map((r) => r.range).sort()).toEqual([
      'bytes=0-999',
      'bytes=1000-1599',
      'bytes=150000-150009',
      'bytes=199995-199999'
    ])
    expect(client.blob(ref, digest).ignoresRange).toBe(false)
  })

  it('uploads in chunks (PATCH) and mounts across repositories', async () => {
    const data = new Uint8Array(randomBytes(70_000))
    const digest = sha(data)
    const path = join(dir, 'chunked')
    await import('node:fs/promises').then((fs) => fs.writeFile(path, data))
    const before = proxy.requests.length
    await client.pushBlob(`${proxy.host}/app/chunked`, digest, { path }, { chunkSize: 32_768 })
    expect(proxy.requests.slice(before).filter((r) => r.method === 'PATCH').length).toBe(3)
    expect(Buffer.from(await client.fetchBlob(`${reg.host}/app/chunked`, digest)).equals(Buffer.from(data))).toBe(true)

    expect(await client.blobExists(`${reg.host}/app/other`, digest)).toBe(false)
    expect(await client.mountBlob(`${reg.host}/app/other`, digest, 'app/chunked')).toBe(true)
    expect(await client.blobExists(`${reg.host}/app/other`, digest)).toBe(true)
    const missing = sha('nothing')
    expect(await client.mountBlob(`${reg.host}/app/other`, missing, 'app/chunked')).toBe(false)
  })

  it('selects the platform from an index, default this machine, and names what exists when none fits', async () => {
    const ref = `${reg.host}/app/multi`
    const amd = await pushImage(client, `${ref}:amd`, [100], { architecture: 'amd64' })
    const arm = await pushImage(client, `${ref}:arm`, [200], { architecture: 'arm64' })
    const index = {
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        {
          mediaType: MediaType.ociManifest,
          digest: amd.digest,
          size: amd.manifestBytes.length,
          platform: { os: 'linux', architecture: 'amd64' }
        },
        {
          mediaType: MediaType.ociManifest,
          digest: arm.digest,
          size: arm.manifestBytes.length,
          platform: { os: 'linux', architecture: 'arm64', variant: 'v8' }
        }
      ]
    }
    await client.putManifest(`${ref}:all`, new TextEncoder().encode(JSON.stringify(index)), MediaType.ociIndex)
    expect((await client.getImage(`${ref}:all`, { platform: 'linux/arm64' })).digest).toBe(arm.digest)
    expect((await client.getImage(`${ref}:all`, { platform: 'linux/amd64' })).digest).toBe(amd.digest)
    const host = await client.getImage(`${ref}:all`)
    expect(host.index?.mediaType).toBe(MediaType.ociIndex)
    expect([amd.digest, arm.digest]).toContain(host.digest)
    const err = await rejection(client.getImage(`${ref}:all`, { platform: 'linux/s390x' }))
    expect(err.name).toBe('PlatformNotFoundError')
    expect(err.message).toContain('linux/amd64, linux/arm64/v8')
    expect(err.message).toContain(`${reg.host}/app/multi@sha256:`)
  })

  it('reports missing manifests and blobs with registry, repository and digest', async () => {
    const e1 = await rejection(client.getImage(`${reg.host}/app/round:nope`))
    expect(e1.name).toBe('ManifestUnknownError')
    expect(e1.message).toContain(`${reg.host}/app/round`)
    const d = sha('missing')
    const e2 = await rejection(client.fetchBlob(`${reg.host}/app/round`, d))
    expect(e2.name).toBe('BlobUnknownError')
    expect(e2.message).toContain(`${reg.host}/app/round@${d}`)
    const e3 = await rejection(client.blob(`${reg.host}/app/round`, d, 100).readAt(0, 10))
    expect(e3.name).toBe('BlobUnknownError')
  })
})

describe('bad input', () => {
  const manifestPath = /\/manifests\//

  it('rejects a malformed manifest', async () => {
    await pushImage(client, `${proxy.host}/bad/m:1`, [10])
    proxy.faults.push({
      kind: 'body',
      path: manifestPath,
      body: '{"schemaVersion":2,"layers":[{"digest":"x"}]}',
      headers: { 'content-type': MediaType.ociManifest }
    })
    const err = await rejection(client.getManifest(`${proxy.host}/bad/m:1`))
    expect(err.name).toBe('ManifestInvalidError')
    expect(err.message).toMatch(/config/)
    proxy.faults.push({
      kind: 'body',
      path: manifestPath,
      body: 'not json',
      headers: { 'content-type': MediaType.ociManifest }
    })
    expect((await rejection(client.getManifest(`${proxy.host}/bad/m:1`))).name).toBe('ManifestInvalidError')
  })

  it('rejects an unknown media type, naming it', async () => {
    proxy.faults.push({
      kind: 'body',
      path: manifestPath,
      body: '{"schemaVersion":1,"name":"x"}',
      headers: { 'content-type': 'application/vnd.docker.distribution.manifest.v1+prettyjws' }
    })
    const err = await rejection(client.getManifest(`${proxy.host}/bad/m:1`))
    expect(err.name).toBe('UnsupportedMediaTypeError')
    expect(err.message).toContain('manifest.v1+prettyjws')
    expect(err.hint).toMatch(/schema 1/)
  })

  it('rejects a manifest whose bytes do not match the digest asked for', async () => {
    const img = await client.getImage(`${reg.host}/bad/m:1`)
    const other = JSON.stringify({ ...JSON.parse(Buffer.from(img.manifestBytes).toString()), annotations: { x: 'y' } })
    proxy.faults.push({
      kind: 'body',
      path: manifestPath,
      body: other,
      headers: { 'content-type': MediaType.ociManifest }
    })
    const err = await rejection(client.getManifest(`${proxy.host}/bad/m@${img.digest}`))
    expect(err.name).toBe('DigestMismatchError')
    expect(err.message).toContain(`bad/m@${img.digest}`)
  })

  it('rejects a blob whose bytes do not match its digest', async () => {
    const img = await client.getImage(`${reg.host}/bad/m:1`)
    proxy.faults.push({ kind: 'body', path: /\/blobs\//, body: 'evil' })
    const err = await rejection(client.fetchBlob(`${proxy.host}/bad/m`, img.config.digest))
    expect(err.name).toBe('DigestMismatchError')
    expect(err.message).toContain(img.config.digest)
    proxy.faults.push({ kind: 'body', path: /\/blobs\//, body: 'evil' })
    const path = join(dir, 'evil')
    expect((await rejection(client.downloadBlob(`${proxy.host}/bad/m`, img.config.digest, path))).name).toBe(
      'DigestMismatchError'
    )
    expect(await readdir(dir)).not.toContain('evil')
  })

  it('refuses a manifest over the size cap', async () => {
    const capped = createRegistryClient({ dockerConfig: false, maxManifestBytes: 100 })
    const err = await rejection(capped.getManifest(`${reg.host}/bad/m:1`))
    expect(err.name).toBe('ManifestTooLargeError')
    expect(err.message).toContain(`${reg.host}/bad/m`)
  })

  it('refuses to push a manifest under a digest it does not have', async () => {
    const bytes = new TextEncoder().encode('{}')
    const err = await rejection(client.putManifest(`${reg.host}/bad/m@${sha('other')}`, bytes, MediaType.ociManifest))
    expect(err.name).toBe('DigestMismatchError')
  })
})
