import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { isMounted } from '@strata/fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createMounts, type MountEvent } from '../src/index.js'
import { cat, DIGEST, type FixtureImage, IMAGE, openFixture, type SourceOptions } from './fixture-source.js'

// The Mounts service by itself, over real FUSE mounts of the fs fixture's layers: what p2pd's routes and
// embedded p2p-mount print are mapped from these events. (Through p2pd and the p2p-mount binary: test/fs.)

let work: string
let fixture: FixtureImage

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-mounts-'))
  fixture = await openFixture(work)
})

afterAll(async () => {
  await fixture?.close()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

const ROOT = { uid: 0, gid: 0 }
const source = (options?: SourceOptions) => fixture.source(options)

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

  it('passes on what opening says, as it comes, before the image is opened', async () => {
    const mounts = createMounts({ source: source({ progress: true }), dataDir: join(work, 'd4') })
    const mountpoint = join(work, 'mnt4')
    await mkdir(mountpoint)
    const stop = new AbortController()
    const events = mounts.mount({ image: IMAGE, mountpoint }, ROOT, { signal: stop.signal })
    const seen: MountEvent[] = []
    for (;;) {
      const e = (await next(events))!
      seen.push(e)
      if (e.type === 'mounted') break
    }
    expect(seen.map((e) => (e.type === 'progress' ? e.event.type : e.type))).toEqual([
      'image:resolved',
      'layer:toc',
      'layer:toc',
      'layer:toc',
      'opened',
      'mounted'
    ])
    stop.abort()
    expect(await next(events)).toEqual({ type: 'result', unmounted: mountpoint })
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
