import { type FaultProxy, startFaultProxy } from '@test/fault-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { createRegistryClient, type Descriptor, MediaType, type RegistryClient } from '../src/index.js'
import { type PushedImage, pushImage, sha } from './image.js'

let reg: TestRegistry
let proxy: FaultProxy
let client: RegistryClient
let amd: PushedImage
let arm: PushedImage
const repo = 'nested/app'
const amd64 = { os: 'linux', architecture: 'amd64' }
/** levels[n]: the digest of an index n levels above the amd64 image (levels[1] names the image itself). */
const levels: string[] = []

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { code?: string; hint?: string }
  }
  throw new Error('expected a rejection')
}

/** Pushes an index of these entries by digest (or under `tag`); returns its descriptor. */
async function pushIndex(manifests: Descriptor[], tag?: string): Promise<Descriptor> {
  const bytes = new TextEncoder().encode(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociIndex, manifests }))
  const ref = `${reg.host}/${repo}${tag !== undefined ? `:${tag}` : `@${sha(bytes)}`}`
  const digest = await client.putManifest(ref, bytes, MediaType.ociIndex)
  return { mediaType: MediaType.ociIndex, digest, size: bytes.length }
}

const manifestOf = (img: PushedImage, platform: Descriptor['platform']): Descriptor => ({
  mediaType: MediaType.ociManifest,
  digest: img.digest,
  size: img.manifestBytes.length,
  ...(platform !== undefined ? { platform } : {})
})

beforeAll(async () => {
  reg = await startRegistry()
  proxy = await startFaultProxy(reg.host)
  client = createRegistryClient({ dockerConfig: false })
  amd = await pushImage(client, `${reg.host}/${repo}:amd`, [100], { architecture: 'amd64' })
  arm = await pushImage(client, `${reg.host}/${repo}:arm`, [200], { architecture: 'arm64' })
  // 300 indexes, each naming the one below it for linux/amd64.
  let child = manifestOf(amd, amd64)
  for (let level = 1; level <= 300; level++) {
    const index = await pushIndex([child])
    levels[level] = index.digest
    child = { ...index, platform: amd64 }
  }
}, 180_000)

afterEach(() => {
  proxy.faults.length = 0
})

afterAll(async () => {
  await proxy?.stop()
  await reg?.stop()
})

describe('indexes that name indexes', () => {
  it('follows an index whose linux/amd64 entry is an index, to the image', async () => {
    const img = await client.getImage(`${reg.host}/${repo}@${levels[2]}`, { platform: 'linux/amd64' })
    expect(img.digest).toBe(amd.digest)
    expect(img.platform).toEqual(amd64)
    expect(img.index?.digest).toBe(levels[1])
  })

  it('follows a nested index that is for no platform in particular', async () => {
    const inner = await pushIndex([manifestOf(amd, amd64), manifestOf(arm, { os: 'linux', architecture: 'arm64' })])
    await pushIndex([inner], 'outer')
    expect((await client.getImage(`${reg.host}/${repo}:outer`, { platform: 'linux/arm64' })).digest).toBe(arm.digest)
    const err = await rejection(client.getImage(`${reg.host}/${repo}:outer`, { platform: 'linux/s390x' }))
    expect(err.name).toBe('PlatformNotFoundError')
    expect(err.message).toBe(
      `${reg.host}/${repo}@${inner.digest}: no image for platform linux/s390x (the index has: linux/amd64, linux/arm64)`
    )
  })

  it('follows indexes 8 levels deep', async () => {
    expect((await client.getImage(`${reg.host}/${repo}@${levels[8]}`, { platform: 'linux/amd64' })).digest).toBe(
      amd.digest
    )
  })

  it('refuses indexes nested deeper, saying so, after reading 9 of them', async () => {
    for (const level of [9, 300]) {
      const before = proxy.requests.length
      const err = await rejection(
        client.getImage(`${proxy.host}/${repo}@${levels[level]}`, { platform: 'linux/amd64' })
      )
      expect(err.name).toBe('IndexTooDeepError')
      expect(err.code).toBe('ERR_INDEX_TOO_DEEP')
      expect(err.message).toBe(
        `${proxy.host}/${repo}@${levels[level]}: image indexes nested more than 8 levels deep (level 9 is the index ${levels[level - 8]})`
      )
      expect(err.hint).toMatch(/malformed or hostile/)
      expect(proxy.requests.slice(before).filter((r) => r.path.includes('/manifests/'))).toHaveLength(9)
    }
  })

  it('says the registry served something else when it answers for an index entry with the index itself', async () => {
    // What a registry would have to do to make an index name itself: no content can hold its own sha256.
    const top = await client.getManifest(`${reg.host}/${repo}@${levels[1]}`)
    const self = JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [{ mediaType: MediaType.ociIndex, digest: top.digest, size: top.bytes.length, platform: amd64 }]
    })
    proxy.faults.push({
      kind: 'body',
      path: /\/manifests\//,
      body: self,
      headers: { 'content-type': MediaType.ociIndex },
      times: Number.POSITIVE_INFINITY
    })
    const err = await rejection(client.getImage(`${proxy.host}/${repo}:self`, { platform: 'linux/amd64' }))
    expect(err.name).toBe('DigestMismatchError')
    expect(err.message).toBe(
      `${proxy.host}/${repo}@${top.digest}: manifest bytes have digest ${sha(self)}, not the requested one`
    )
  })
})
