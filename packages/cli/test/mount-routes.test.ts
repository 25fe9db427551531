import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { ImageSource } from '@strata/mounts'
import type { ControlRequest, ControlServer, RouteHandler, StrataNode } from '@strata/node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { cat, DIGEST, type FixtureImage, IMAGE, openFixture } from '../../mounts/test/fixture-source.js'
import { addMountRoutes, type MountRoutes } from '../src/mount-routes.js'

// p2pd's mount routes are a thin face of the Mounts service: what they answer is what p2p-mount and operators'
// scripts read, line for line. The routes are called as the control server calls them, over a real FUSE mount
// (through the session holder) of the fs fixture's layers.

let work: string
let fixture: FixtureImage

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-mount-routes-'))
  fixture = await openFixture(work)
})

afterAll(async () => {
  await fixture?.close()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

const ROOT = { uid: 0, gid: 0, pid: 0 }

/** The routes as a control server holds them, by `METHOD /path`. */
function serve(node: ImageSource): {
  routes: MountRoutes
  call(method: string, path: string, body: unknown, caller?: ControlRequest['caller']): ReturnType<RouteHandler>
} {
  const handlers: { method: string; pattern: RegExp; handler: RouteHandler }[] = []
  const control = {
    route: (method: string, pattern: RegExp, handler: RouteHandler) => handlers.push({ method, pattern, handler })
  } as unknown as ControlServer
  const dataDir = join(work, 'data')
  const routes = addMountRoutes(control, node as unknown as StrataNode, { dataDir, socket: join(dataDir, 'p2pd.sock') })
  return {
    routes,
    call(method, path, body, caller = ROOT) {
      const found = handlers.find((h) => h.method === method && new RegExp(`^${h.pattern.source}$`).test(path))
      if (found === undefined) throw new Error(`no route ${method} ${path}`)
      return found.handler({ body, caller, match: /./.exec('.')!, signal: new AbortController().signal })
    }
  }
}

describe("p2pd's mount routes", () => {
  it('answer POST /mount with the JSON lines p2p-mount reads, GET /mounts and POST /unmount', async () => {
    const failing = new Set<string>()
    const { routes, call } = serve(fixture.source({ stale: 'the registry is away', failing }))
    await routes.resumed
    const mountpoint = join(work, 'mnt')
    await mkdir(mountpoint)
    expect(() => call('POST', '/mount', { image: IMAGE })).toThrow(
      expect.objectContaining({
        name: 'BadRequest',
        status: 400,
        message: 'POST /mount needs {"image": "REF", "mountpoint": "/ABSOLUTE/PATH"}'
      })
    )
    const events = (call('POST', '/mount', { image: IMAGE, mountpoint }) as AsyncIterable<unknown>)[
      Symbol.asyncIterator
    ]()
    const line = async () => {
      const r = await events.next()
      return r.done === true ? undefined : JSON.stringify(r.value)
    }
    expect(await line()).toBe('{"type":"warning","message":"the registry is away"}')
    expect(await line()).toBe(`{"type":"opened","image":"${IMAGE}","digest":"${DIGEST}","layers":3}`)
    expect(await line()).toBe(`{"type":"mounted","mountpoint":"${mountpoint}"}`)
    try {
      expect(await call('GET', '/mounts', undefined)).toMatchObject([
        { mountpoint, image: IMAGE, digest: DIGEST, uid: 0, fuse: { mode: expect.any(String) } }
      ])
      failing.add('data/n1')
      const failed = line()
      expect((await cat(join(mountpoint, 'data', 'n1'))).code).not.toBe(0)
      const error = JSON.parse((await failed)!)
      expect(Object.keys(error)).toEqual(['type', 'path', 'layer', 'message'])
      expect(error).toMatchObject({ type: 'read-error', layer: 1, message: 'no bytes for data/n1' })

      await expect(call('POST', '/unmount', { mountpoint }, { uid: 4242, gid: 4242, pid: 0 })).rejects.toMatchObject({
        name: 'Forbidden',
        status: 403
      })
      expect(await call('POST', '/unmount', { mountpoint })).toEqual({ unmounted: true })
      expect(await line()).toBe(`{"type":"result","unmounted":"${mountpoint}"}`)
      expect(await line()).toBeUndefined()
      expect(await call('POST', '/unmount', { mountpoint })).toEqual({ unmounted: false })
    } finally {
      await (call('POST', '/unmount', { mountpoint }) as Promise<unknown>).catch(() => {})
      await routes.close()
    }
  })
})
