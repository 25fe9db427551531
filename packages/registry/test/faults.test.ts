import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type FaultProxy, startFaultProxy } from '@test/fault-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { createRegistryClient, type RegistryClient } from '../src/index.js'
import { type PushedImage, pushImage, sha } from './image.js'

let reg: TestRegistry
let proxy: FaultProxy
let client: RegistryClient
let image: PushedImage
let dir: string
const repo = 'faults/app'
let ref: string
let layer: Uint8Array
let layerDigest: string

beforeAll(async () => {
  reg = await startRegistry()
  proxy = await startFaultProxy(reg.host)
  client = createRegistryClient({ dockerConfig: false, backoffMs: 20, timeoutMs: 1000, retries: 2 })
  ref = `${proxy.host}/${repo}:1`
  image = await pushImage(client, ref, [300_000])
  layer = image.layers[0]!
  layerDigest = sha(layer)
  dir = await mkdtemp(join(tmpdir(), 'strata-faults-test-'))
})

afterEach(() => {
  proxy.faults.length = 0
})

afterAll(async () => {
  await proxy?.stop()
  await reg?.stop()
  await rm(dir, { recursive: true, force: true })
})

async function rejection(p: Promise<unknown>): Promise<Error & { hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { hint?: string }
  }
  throw new Error('expected a rejection')
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b))
const blobs = /\/blobs\/sha256:/

describe('faults between client and registry', () => {
  it('retries 5xx and then succeeds', async () => {
    proxy.faults.push({ kind: 'status', status: 503, path: /\/manifests\//, times: 2 })
    const img = await client.getImage(ref)
    expect(img.digest).toBe(image.digest)
    expect(proxy.requests.filter((r) => r.fault === 'status').length).toBe(2)
  })

  it('gives up on persistent 5xx naming the registry, repository and digest', async () => {
    proxy.faults.push({ kind: 'status', status: 500, path: blobs, times: Number.POSITIVE_INFINITY })
    const err = await rejection(client.blob(ref, layerDigest, layer.length).readAt(0, 10))
    expect(err.name).toBe('RegistryUnavailableError')
    expect(err.message).toContain(`${proxy.host}/${repo}@${layerDigest}`)
    expect(err.message).toContain('after 3 attempts')
  })

  it('honours Retry-After on 429', async () => {
    proxy.faults.push({ kind: 'status', status: 429, path: blobs, headers: { 'retry-after': '1' } })
    const started = Date.now()
    const bytes = await client.blob(ref, layerDigest, layer.length).readAt(100, 50)
    expect(Date.now() - started).toBeGreaterThanOrEqual(950)
    expect(same(bytes, layer.subarray(100, 150))).toBe(true)
  })

  it('fails at once when Retry-After is longer than allowed', async () => {
    const impatient = createRegistryClient({ dockerConfig: false, maxRetryAfterMs: 500 })
    proxy.faults.push({ kind: 'status', status: 429, path: blobs, headers: { 'retry-after': '120' } })
    const err = await rejection(impatient.fetchBlob(ref, sha(image.config)))
    expect(err.name).toBe('TooManyRequestsError')
    expect(err.message).toContain('asks to wait 120 s')
    expect(err.hint).toMatch(/rate-limits/)
  })

  it('retries a truncated range body and never returns short data', async () => {
    proxy.faults.push({ kind: 'truncate', bytes: 1000, path: blobs })
    const bytes = await client.blob(ref, layerDigest, layer.length).readAt(0, 50_000)
    expect(same(bytes, layer.subarray(0, 50_000))).toBe(true)

    proxy.faults.push({ kind: 'truncate', bytes: 1000, path: blobs, times: Number.POSITIVE_INFINITY })
    const err = await rejection(client.blob(ref, layerDigest, layer.length).readAt(0, 50_000))
    expect(err.name).toBe('ShortReadError')
    expect(err.message).toContain(`${repo}@${layerDigest}`)
  })

  it('retries a truncated download and leaves no partial file', async () => {
    proxy.faults.push({ kind: 'truncate', bytes: 5000, path: blobs })
    const path = join(dir, 'layer')
    await client.downloadBlob(ref, layerDigest, path)
    expect(same(await readFile(path), layer)).toBe(true)
    proxy.faults.push({ kind: 'truncate', bytes: 5000, path: blobs, times: Number.POSITIVE_INFINITY })
    const err = await rejection(client.downloadBlob(ref, layerDigest, join(dir, 'other')))
    expect(err.name).toBe('ShortReadError')
    expect((await readdir(dir)).sort()).toEqual(['layer'])
  })

  it('takes the slice from a 200 with the whole blob, and then reads many ranges in one request', async () => {
    const refusing = createRegistryClient({ dockerConfig: false })
    proxy.faults.push({ kind: 'ignoreRange', path: blobs, times: Number.POSITIVE_INFINITY })
    const blob = refusing.blob(ref, layerDigest, layer.length)
    expect(same(await blob.readAt(200_000, 1234), layer.subarray(200_000, 201_234))).toBe(true)
    const before = proxy.requests.length
    const ranges = [
      { offset: 10, length: 10 },
      { offset: 100_000, length: 10 },
      { offset: 299_990, length: 10 }
    ]
    expect(blob.ignoresRange).toBe(true)
    const got: Uint8Array[] = []
    await blob.readRuns(ranges, (i, bytes) => {
      got[i] = bytes
    })
    for (const [i, r] of ranges.entries())
      expect(same(got[i]!, layer.subarray(r.offset, r.offset + r.length))).toBe(true)
    expect(proxy.requests.slice(before).filter((r) => r.method === 'GET').length).toBe(1)
    // A client that does not know the registry yet: the 200 to its first run serves the others too.
    const fresh = createRegistryClient({ dockerConfig: false })
    const first = proxy.requests.length
    const again: Uint8Array[] = []
    await fresh.blob(ref, layerDigest, layer.length).readRuns(ranges, (i, bytes) => {
      again[i] = bytes
    })
    for (const [i, r] of ranges.entries())
      expect(same(again[i]!, layer.subarray(r.offset, r.offset + r.length))).toBe(true)
    expect(proxy.requests.slice(first).filter((r) => r.method === 'GET').length).toBe(1)
  })

  it('times out slow headers and slow bodies, retries, then fails with a clear error', async () => {
    proxy.faults.push({ kind: 'delay', ms: 1500, path: blobs })
    const bytes = await client.blob(ref, layerDigest, layer.length).readAt(0, 10)
    expect(same(bytes, layer.subarray(0, 10))).toBe(true)

    proxy.faults.push({ kind: 'stall', afterBytes: 100, path: blobs, times: Number.POSITIVE_INFINITY })
    const started = Date.now()
    const err = await rejection(client.blob(ref, layerDigest, layer.length).readAt(0, 50_000))
    expect(err.name).toBe('RegistryTimeoutError')
    expect(err.message).toContain(`${repo}@${layerDigest}`)
    expect(Date.now() - started).toBeLessThan(8000)
  })

  it('stops at once when aborted', async () => {
    proxy.faults.push({ kind: 'delay', ms: 800, path: blobs })
    const ac = new AbortController()
    setTimeout(() => ac.abort(new Error('stop now')), 100)
    const err = await rejection(client.blob(ref, layerDigest, layer.length).readAt(0, 10, { signal: ac.signal }))
    expect(err.message).toBe('stop now')
  })

  it('follows a redirect to blob storage, without the registry authorization', async () => {
    proxy.faults.push({ kind: 'redirect', path: blobs, method: 'GET', times: Number.POSITIVE_INFINITY })
    const blob = client.blob(ref, layerDigest, layer.length)
    expect(same(await blob.readAt(5, 5), layer.subarray(5, 10))).toBe(true)
    // The redirect target is remembered: the second read goes straight to storage.
    const before = proxy.requests.length
    expect(same(await blob.readAt(50, 5), layer.subarray(50, 55))).toBe(true)
    expect(proxy.requests.slice(before).map((r) => r.path.startsWith('/_storage/'))).toEqual([true])
  })

  it('re-resolves an expired storage URL (403) from the registry once', async () => {
    const fresh = createRegistryClient({ dockerConfig: false, retries: 0 })
    proxy.faults.push(
      { kind: 'redirect', path: blobs, method: 'GET', times: Number.POSITIVE_INFINITY },
      { kind: 'status', status: 403, path: '/_storage/', skip: 1, times: 1 }
    )
    const blob = fresh.blob(ref, layerDigest, layer.length)
    await blob.readAt(0, 10)
    const before = proxy.requests.length
    expect(same(await blob.readAt(1000, 10), layer.subarray(1000, 1010))).toBe(true)
    const kinds = proxy.requests.slice(before).map((r) => (r.path.startsWith('/_storage/') ? 'storage' : 'registry'))
    expect(kinds).toEqual(['storage', 'registry', 'storage'])

    proxy.faults.push({ kind: 'status', status: 403, path: '/_storage/', times: Number.POSITIVE_INFINITY })
    proxy.faults.reverse()
    const err = await rejection(fresh.blob(ref, layerDigest, layer.length).readAt(0, 10))
    expect(err.name).toBe('DeniedError')
    expect(err.message).toContain(`${repo}@${layerDigest}`)
  })
})
