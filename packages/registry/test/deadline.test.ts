import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { createRegistryClient, MediaType, type RegistryClient } from '../src/index.js'
import { type PushedImage, pushImage, sha } from './image.js'
import { startTrickleProxy, type TrickleProxy } from './trickle-proxy.js'

let reg: TestRegistry
let slow: TrickleProxy
/** A 1 s deadline; the idle timeout stays at its default of 30 s, which a trickle never trips. */
let client: RegistryClient
let image: PushedImage
let indexDigest: string
let dir: string
const repo = 'deadline/app'

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { code?: string; hint?: string }
  }
  throw new Error('expected a rejection')
}

/** How long `p` takes to settle, and its error. */
async function timed(p: Promise<unknown>): Promise<{ ms: number; err: Error & { code?: string; hint?: string } }> {
  const start = performance.now()
  const err = await rejection(p)
  return { ms: performance.now() - start, err }
}

beforeAll(async () => {
  reg = await startRegistry()
  // One byte every 100 ms: a manifest of ~400 bytes takes 40 s, and a byte arrives long before 30 s pass.
  slow = await startTrickleProxy(reg.host, { bytes: 1, everyMs: 100 })
  client = createRegistryClient({ dockerConfig: false, deadlineMs: 1000 })
  image = await pushImage(client, `${reg.host}/${repo}:1`, [30_000])
  const index = new TextEncoder().encode(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociIndex,
      manifests: [
        {
          mediaType: MediaType.ociManifest,
          digest: image.digest,
          size: image.manifestBytes.length,
          platform: { os: 'linux', architecture: 'amd64' }
        }
      ]
    })
  )
  indexDigest = await client.putManifest(`${reg.host}/${repo}:index`, index, MediaType.ociIndex)
  dir = await mkdtemp(join(tmpdir(), 'strata-deadline-test-'))
})

afterEach(() => {
  slow.match = () => false
  slow.bytes = 1
  slow.trickled.length = 0
})

afterAll(async () => {
  await slow?.stop()
  await reg?.stop()
  if (dir !== undefined) await rm(dir, { recursive: true, force: true })
})

const manifests = ({ path }: { path: string }) => path.includes('/manifests/')
const blobs = ({ path }: { path: string }) => path.includes('/blobs/')

describe('the deadline of small reads, against a registry that trickles its answers', () => {
  it('ends a manifest read at the deadline, naming it, and does not retry', { timeout: 15_000 }, async () => {
    slow.match = manifests
    const { ms, err } = await timed(client.getManifest(`${slow.host}/${repo}:1`))
    expect(err.name).toBe('RegistryDeadlineExceededError')
    expect(err.code).toBe('ERR_REGISTRY_DEADLINE_EXCEEDED')
    expect(err.message).toBe(`${slow.host}/${repo}: reading the manifest of tag 1 took longer than the deadline of 1 s`)
    expect(err.hint).toMatch(/too slowly.*deadlineMs/)
    expect(ms).toBeGreaterThanOrEqual(950)
    expect(ms).toBeLessThan(5000)
    expect(slow.trickled).toHaveLength(1)
    // The client hung up: the rest of the manifest was never sent.
    await new Promise((r) => setTimeout(r, 300))
    expect(slow.trickled[0]!.aborted).toBe(true)
  })

  it('ends the read of the image manifest an index names, naming its digest', { timeout: 15_000 }, async () => {
    slow.match = ({ path }) => path.endsWith(`/manifests/${image.digest}`)
    const { ms, err } = await timed(client.getImage(`${slow.host}/${repo}:index`, { platform: 'linux/amd64' }))
    expect(err.name).toBe('RegistryDeadlineExceededError')
    expect(err.message).toBe(
      `${slow.host}/${repo}@${image.digest}: reading the manifest took longer than the deadline of 1 s`
    )
    expect(ms).toBeLessThan(5000)
    slow.match = ({ path }) => path.endsWith(`/manifests/${indexDigest}`)
    const e2 = await rejection(client.getImage(`${slow.host}/${repo}@${indexDigest}`, { platform: 'linux/amd64' }))
    expect(e2.message).toBe(
      `${slow.host}/${repo}@${indexDigest}: reading the manifest took longer than the deadline of 1 s`
    )
  })

  it('ends a config read at the deadline', { timeout: 15_000 }, async () => {
    slow.match = blobs
    const config = sha(image.config)
    const { ms, err } = await timed(client.fetchBlob(`${slow.host}/${repo}`, config))
    expect(err.name).toBe('RegistryDeadlineExceededError')
    expect(err.message).toBe(
      `${slow.host}/${repo}@${config}: reading the blob (a config, read whole) took longer than the deadline of 1 s`
    )
    expect(ms).toBeLessThan(5000)
  })

  it('ends the range reads of a blob opened with a deadline (a TOC), naming what they are', {
    timeout: 15_000
  }, async () => {
    slow.match = blobs
    const layer = sha(image.layers[0]!)
    const blob = client.blob(`${slow.host}/${repo}`, layer, 30_000, { deadline: true, what: 'the TOC' })
    const { ms, err } = await timed(blob.readAt(29_000, 1000))
    expect(err.name).toBe('RegistryDeadlineExceededError')
    expect(err.message).toBe(
      `${slow.host}/${repo}@${layer}: reading the TOC (1000 bytes at offset 29000) took longer than the deadline of 1 s`
    )
    expect(ms).toBeLessThan(5000)
    // A deadline of its own, in ms.
    const own = client.blob(`${slow.host}/${repo}`, layer, 30_000, { deadline: 300 })
    const e2 = await rejection(own.readRuns([{ offset: 0, length: 100 }], () => {}))
    expect(e2.message).toBe(
      `${slow.host}/${repo}@${layer}: reading a range of the blob (100 bytes at offset 0) took longer than the deadline of 300 ms`
    )
  })

  it('puts no deadline on whole-layer downloads or plain range reads: slow is not stalled', {
    timeout: 30_000
  }, async () => {
    // 30 kB at 1 kB per 100 ms: 3 s, three times the deadline.
    slow.match = blobs
    slow.bytes = 1000
    const layer = image.layers[0]!
    const path = join(dir, 'layer')
    await client.downloadBlob(`${slow.host}/${repo}`, sha(layer), path)
    expect((await readFile(path)).equals(Buffer.from(layer))).toBe(true)
    const bytes = await client.blob(`${slow.host}/${repo}`, sha(layer), layer.length).readAt(0, 20_000)
    expect(Buffer.from(bytes).equals(Buffer.from(layer.subarray(0, 20_000)))).toBe(true)
    expect(slow.trickled.map((t) => t.aborted)).toEqual([false, false])
  })

  it("lets the caller's abort win over the deadline", { timeout: 15_000 }, async () => {
    slow.match = manifests
    const err = await rejection(client.getManifest(`${slow.host}/${repo}:1`, { signal: AbortSignal.timeout(200) }))
    expect(err.name).toBe('TimeoutError')
  })
})
