import { spawn } from 'node:child_process'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Image } from '@strata/fetcher'
import { isMounted } from '@strata/fs'
import { type FileReadAt, fileReader, type Layer, openLayer, readFileRange, type TOC } from '@strata/stargz'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Fixture, makeFixture } from '../../../test/fs/fixture.js'
import { createMounts, type ImageSource, type MountEvent } from '../src/index.js'

// The Mounts service by itself, over real FUSE mounts of the fs fixture's layers: what p2pd's routes and
// embedded p2p-mount print are mapped from these events. (Through p2pd and the p2p-mount binary: test/fs.)
// Whatever reads a mount runs as a child process: this process serves the mount.

let work: string
let fixture: Fixture
let readers: FileReadAt[]
let layers: Layer[]

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-mounts-'))
  fixture = await makeFixture(work)
  readers = await Promise.all(fixture.blobs.map((b) => fileReader(b.path)))
  layers = await Promise.all(readers.map((r, i) => openLayer(r, { tocDigest: fixture.blobs[i]!.tocDigest })))
})

afterAll(async () => {
  await Promise.all((readers ?? []).map((r) => r.close()))
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

const IMAGE = 'localhost:5000/fixture:1'
const DIGEST = `sha256:${'d'.repeat(64)}`
const ROOT = { uid: 0, gid: 0 }

/** The fixture as an opened image, read from the blob files; reads of `failing` paths fail. */
function source(options: { stale?: string; failing?: Set<string>; prioritized?: string } = {}): ImageSource {
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
    async openImage(_ref, opts) {
      if (options.stale !== undefined) opts?.onStale?.(options.stale)
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

async function cat(path: string): Promise<{ code: number | null; stdout: string }> {
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

async function next(events: AsyncGenerator<MountEvent>): Promise<MountEvent | undefined> {
  const r = await events.next()
  return r.done === true ? undefined : r.value
}

describe('the Mounts service', () => {
  it('mounts, lists, passes read errors on, and unmounts for its owner or root only', async () => {
    const failing = new Set<string>()
    const mounts = createMounts({
      source: source({ stale: 'the registry is away', failing }),
      dataDir: join(work, 'd1')
    })
    const mountpoint = join(work, 'mnt1')
    await mkdir(mountpoint)
    const events = mounts.mount({ image: IMAGE, mountpoint }, ROOT)
    expect(await next(events)).toEqual({ type: 'warning', message: 'the registry is away' })
    expect(await next(events)).toEqual({ type: 'opened', image: IMAGE, digest: DIGEST, layers: 3 })
    expect(await next(events)).toEqual({ type: 'mounted', mountpoint })
    try {
      expect(mounts.list()).toMatchObject([{ mountpoint, image: IMAGE, digest: DIGEST, uid: 0 }])
      expect(() => mounts.mount({ image: IMAGE, mountpoint }, ROOT)).toThrow(
        expect.objectContaining({ name: 'MountBusy', status: 409 })
      )
      expect(await cat(join(mountpoint, 'data', 'a'))).toEqual({ code: 0, stdout: 'alpha, replaced\n' })

      failing.add('data/n1')
      const pending = next(events)
      expect((await cat(join(mountpoint, 'data', 'n1'))).code).not.toBe(0)
      const failed = await pending
      expect(failed).toMatchObject({
        type: 'read-error',
        failure: { path: expect.stringMatching(/data\/n1$/), layer: 1 }
      })
      expect((failed as { failure: { error: Error } }).failure.error.message).toBe('no bytes for data/n1')

      await expect(mounts.unmount(mountpoint, { uid: 4242, gid: 4242 })).rejects.toMatchObject({
        name: 'Forbidden',
        status: 403,
        message: `the mount at ${mountpoint} belongs to uid 0, not to you`
      })
      expect(await mounts.unmount(mountpoint, ROOT)).toBe(true)
      expect(await next(events)).toEqual({ type: 'result', unmounted: mountpoint })
      expect(await next(events)).toBeUndefined()
      expect(await isMounted(mountpoint)).toBe(false)
      expect(mounts.list()).toEqual([])
      expect(await mounts.unmount(mountpoint, ROOT)).toBe(false)
    } finally {
      await mounts.unmount(mountpoint, ROOT).catch(() => {})
    }
  })

  it('serves again only what it holds', async () => {
    const mounts = createMounts({ source: source(), dataDir: join(work, 'd2') })
    const events = mounts.mount({ image: IMAGE, mountpoint: join(work, 'none'), resume: true }, ROOT)
    await expect(events.next()).rejects.toMatchObject({
      name: 'MountGone',
      status: 404,
      message: `p2pd holds no mount at ${join(work, 'none')} any more`
    })
  })

  it('embedded: prefetches the prioritized files once mounted, and unmounts when its signal aborts', async () => {
    const mounts = createMounts({
      source: source({ prioritized: 'data/owned' }),
      dataDir: join(work, 'd3'),
      prefetch: true
    })
    const mountpoint = join(work, 'mnt3')
    await mkdir(mountpoint)
    const stop = new AbortController()
    const events = mounts.mount({ image: IMAGE, mountpoint }, ROOT, { signal: stop.signal })
    expect(await next(events)).toMatchObject({ type: 'opened' })
    expect(await next(events)).toEqual({ type: 'mounted', mountpoint })
    expect(await next(events)).toMatchObject({ type: 'prefetched', bytes: 'mine\n'.length })
    stop.abort()
    expect(await next(events)).toEqual({ type: 'result', unmounted: mountpoint })
    expect(await isMounted(mountpoint)).toBe(false)
  })
})
