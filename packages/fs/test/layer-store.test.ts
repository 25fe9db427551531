// The layer store over a real FUSE mount, with a fake image source: what podman's lookups get, and when.
import { execFile } from 'node:child_process'
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type LayerStore, mountLayerStore, type StoreImage, type StoreLayer } from '../src/index.js'
import { contentOf, makeToc } from './toc.js'

const root = process.getuid?.() === 0
const exec = promisify(execFile)

const layer = (digest: string, toc: string, entries: Parameters<typeof makeToc>[0]): StoreLayer => ({
  digest,
  descriptor: { size: 100 },
  format: 'estargz',
  toc: makeToc(entries).toc,
  tocDigest: toc,
  verified: true,
  compression: 'gzip'
})
const sha = (c: string) => `sha256:${c.repeat(64)}`

describe.runIf(root)('the layer store mounted', () => {
  let dir: string
  let store: LayerStore
  const opened: string[] = []
  let failNext = true
  let image: StoreImage<StoreLayer> = {
    digest: sha('1'),
    config: { digest: sha('c') },
    layers: [
      layer(sha('a'), sha('e'), [{ path: 'etc/passwd', size: 10 }]),
      layer(sha('b'), sha('f'), [{ path: 'etc/.wh.passwd' }, { path: 'bin/sh', size: 50 }])
    ]
  }
  const b64 = (ref: string) => Buffer.from(ref).toString('base64')
  const ref = 'registry.example/app:1'

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'strata-layer-store-'))
    store = await mountLayerStore({
      mountpoint: join(dir, 'store'),
      source: {
        async openImage(r) {
          opened.push(r)
          if (r.includes('flaky') && failNext) {
            failNext = false
            throw new Error('registry down')
          }
          if (r.includes('missing')) throw new Error('manifest unknown')
          return image
        },
        fetchBlob: async () =>
          Buffer.from(JSON.stringify({ rootfs: { diff_ids: image.layers.map((_, i) => sha(`${i}`)) } })),
        readBlob: async (_r, _l, offset, length) => new Uint8Array(length).fill(offset === 0 ? 0x1f : 0),
        fetcher: {
          readRange: async (_l, entry, offset, into) => {
            into.set(contentOf(entry).subarray(offset, offset + into.length))
            return into.length
          }
        }
      }
    })
  })

  afterAll(async () => {
    await store?.unmount()
    if (dir !== undefined) await rm(dir, { recursive: true, force: true })
  })

  it('lists nothing at its root and opens an image when its reference is looked up', async () => {
    const s = join(dir, 'store')
    expect(await readdir(s)).toEqual([])
    const layerDir = join(s, b64(ref), sha('b'))
    expect(await readdir(layerDir)).toEqual(['blob', 'diff', 'info'])
    expect(opened).toEqual([ref])
    expect(await readdir(join(s, b64(ref)))).toEqual([sha('a'), sha('b')])
    expect(JSON.parse(await readFile(join(layerDir, 'info'), 'utf8'))).toMatchObject({ 'diff-digest': sha('1') })
    expect((await stat(join(layerDir, 'blob'))).size).toBe(100)
    expect((await readFile(join(layerDir, 'blob')))[0]).toBe(0x1f)
    expect(await readFile(join(layerDir, 'diff', 'bin', 'sh'))).toEqual(
      Buffer.from(contentOf(image.layers[1]!.toc.lookup('bin/sh')!))
    )
    const wh = await stat(join(layerDir, 'diff', 'etc', 'passwd'))
    expect(wh.isCharacterDevice() && wh.rdev === 0).toBe(true)
    // By TOC digest, the newer layout.
    expect(JSON.parse(await readFile(join(s, b64(ref), sha('f'), 'info'), 'utf8'))).toMatchObject({
      'toc-digest': sha('f'),
      flags: { 'expected-layer-diffid': sha('1') }
    })
  })

  it('does not cache a miss: an image that failed to open, or a layer a moved tag has now', async () => {
    const s = join(dir, 'store')
    const flaky = b64('registry.example/flaky:1')
    await expect(stat(join(s, flaky))).rejects.toMatchObject({ code: 'ENOENT' })
    expect((await stat(join(s, flaky))).isDirectory()).toBe(true)
    await expect(stat(join(s, b64('registry.example/missing:1')))).rejects.toMatchObject({ code: 'ENOENT' })
    await expect(stat(join(s, 'not base64!'))).rejects.toMatchObject({ code: 'ENOENT' })
    // The tag moves: a layer of the image it names now is found (the image is opened again).
    await expect(stat(join(s, b64(ref), sha('d')))).rejects.toMatchObject({ code: 'ENOENT' })
    image = { ...image, digest: sha('2'), layers: [...image.layers, layer(sha('d'), sha('9'), [])] }
    expect((await stat(join(s, b64(ref), sha('d'), 'diff'))).isDirectory()).toBe(true)
  })

  it("answers podman's use and release notices with ENOENT and refuses any other change", async () => {
    const layerDir = join(dir, 'store', b64(ref), sha('a'))
    await expect(writeFile(join(layerDir, 'use'), '')).rejects.toMatchObject({ code: 'ENOENT' })
    await expect(exec('rmdir', [layerDir])).rejects.toMatchObject({ stderr: expect.stringMatching(/No such file/) })
    expect(store.stats()).toMatchObject({ uses: 1, releases: 1 })
    // Still there: the notices change nothing.
    expect(await readdir(layerDir)).toEqual(['blob', 'diff', 'info'])
    await expect(writeFile(join(layerDir, 'other'), '')).rejects.toMatchObject({ code: 'EROFS' })
    await expect(writeFile(join(layerDir, 'diff', 'etc', 'passwd'), '')).rejects.toMatchObject({ code: 'EROFS' })
    await expect(writeFile(join(layerDir, 'info'), '')).rejects.toMatchObject({ code: 'EROFS' })
  })
})
