// The snapshotter without containerd: overlay semantics, labels, remote resolution, filters, persistence, and
// the gRPC surface containerd sees (status codes). Mounting is left to the containerd tests.
import { createHash } from 'node:crypto'
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { credentials, loadPackageDefinition, type ServiceError } from '@grpc/grpc-js'
import { loadSync } from '@grpc/proto-loader'
import type { Image } from '@strata/fetcher'
import {
  CRI_LABELS,
  chainIds,
  containerdConfig,
  parseFilters,
  REMOTE_LABEL,
  remoteRequest,
  SNAPSHOT_REF_LABEL,
  Snapshotter,
  type SnapshotterInit,
  STARGZ_LABELS,
  Status,
  serveSnapshots
} from '@strata/snapshotter'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'

const sha = (s: string) => `sha256:${createHash('sha256').update(s).digest('hex')}`
const DIFFS = [sha('diff0'), sha('diff1')]
const CHAIN = chainIds(DIFFS)
const LAYERS = [sha('blob0'), sha('blob1')]
const MANIFEST = sha('manifest')
const REF = '127.0.0.1:5000/app:1'

/** An image source with one two-layer image and no network. */
function fakeSource(): SnapshotterInit['source'] & { opened: string[] } {
  const opened: string[] = []
  const toc = { entries: new Map([['etc/a', { type: 'reg', size: 10 }]]), prioritized: [] }
  return {
    opened,
    fetcher: {} as SnapshotterInit['source']['fetcher'],
    async openImage(ref) {
      opened.push(ref)
      return {
        ref,
        digest: MANIFEST,
        config: { digest: sha('config'), size: 1, mediaType: 'application/vnd.oci.image.config.v1+json' },
        layers: LAYERS.map((digest) => ({ digest, toc }))
      } as unknown as Image
    },
    async fetchBlob() {
      return new TextEncoder().encode(JSON.stringify({ rootfs: { type: 'layers', diff_ids: DIFFS } }))
    }
  }
}

const criLabels = (i: number) => ({
  [SNAPSHOT_REF_LABEL]: CHAIN[i]!,
  [CRI_LABELS.imageRef]: REF,
  [CRI_LABELS.layerDigest]: LAYERS[i]!,
  [CRI_LABELS.manifestDigest]: MANIFEST
})

describe('snapshotter', () => {
  let root: string
  let sn: Snapshotter
  let source: ReturnType<typeof fakeSource>
  const open = () => Snapshotter.open({ root, source, prefetch: false })

  beforeEach(async () => {
    root = join(await mkdtemp(join(tmpdir(), 'strata-sn-')), 'snapshotter')
    source = fakeSource()
    sn = await open()
  })
  afterEach(async () => {
    await sn.close()
    await rm(join(root, '..'), { recursive: true, force: true })
  })

  it('has overlay semantics: bind without a parent, overlay over committed parents, read-only views', async () => {
    const first = await sn.prepare('ns/1/extract-a', '', { [SNAPSHOT_REF_LABEL]: 'sha256:x' })
    expect(first).toHaveLength(1)
    expect(first[0]!.type).toBe('bind')
    expect(first[0]!.options).toContain('rw')
    const fs0 = first[0]!.source
    await writeFile(join(fs0, 'file'), 'layer 0')
    await sn.commit('ns/2/sha256:x', 'ns/1/extract-a', { [SNAPSHOT_REF_LABEL]: 'sha256:x' })
    expect(sn.stat('ns/2/sha256:x')).toMatchObject({ kind: 'committed', parent: '' })
    await expect(sn.mounts('ns/1/extract-a')).rejects.toMatchObject({ status: Status.NOT_FOUND })

    const second = await sn.prepare('ns/3/extract-b', 'ns/2/sha256:x', {})
    expect(second[0]!.type).toBe('overlay')
    const opts = second[0]!.options
    expect(opts).toContain(`lowerdir=${fs0}`)
    const upper = opts.find((o) => o.startsWith('upperdir='))!.slice('upperdir='.length)
    expect(opts.find((o) => o.startsWith('workdir='))).toBeDefined()
    // Directories are numbered: no ':' or ',' in what overlayfs gets.
    for (const o of opts) expect(o.split('=')[1]).not.toMatch(/[:,]/)
    await sn.commit('ns/4/sha256:y', 'ns/3/extract-b', {})

    const view = await sn.view('ns/5/view', 'ns/4/sha256:y', {})
    expect(view[0]!.type).toBe('overlay')
    expect(view[0]!.options).toContain(`lowerdir=${upper}:${fs0}`)
    expect(view[0]!.options.some((o) => o.startsWith('upperdir='))).toBe(false)
    const oneView = await sn.view('ns/6/view', 'ns/2/sha256:x', {})
    expect(oneView).toEqual([{ type: 'bind', source: fs0, options: ['rbind', 'ro'] }])
    expect(sn.stat('ns/6/view').kind).toBe('view')
  })

  it('answers with the status codes containerd acts on', async () => {
    expect(() => sn.stat('nope')).toThrow(expect.objectContaining({ status: Status.NOT_FOUND }))
    await expect(sn.remove('nope')).rejects.toMatchObject({ status: Status.NOT_FOUND })
    await expect(sn.prepare('a', 'missing-parent', {})).rejects.toMatchObject({ status: Status.NOT_FOUND })
    await sn.prepare('a', '', {})
    await expect(sn.prepare('a', '', {})).rejects.toMatchObject({ status: Status.ALREADY_EXISTS })
    await expect(sn.prepare('b', 'a', {})).rejects.toMatchObject({ status: Status.INVALID_ARGUMENT })
    await sn.commit('c', 'a', {})
    await expect(sn.commit('d', 'c', {})).rejects.toMatchObject({ status: Status.FAILED_PRECONDITION })
    await sn.prepare('e', 'c', {})
    await expect(sn.remove('c')).rejects.toMatchObject({ status: Status.FAILED_PRECONDITION })
    await sn.remove('e')
    await sn.remove('c')
    expect(sn.list([])).toEqual([])
    expect(await readdir(join(root, 'snapshots'))).toEqual([])
  })

  it('updates labels by field path and lists by containerd filters', async () => {
    await sn.prepare('k1', '', { a: '1', b: '2' })
    await sn.commit('n1', 'k1', { a: '1', b: '2' })
    expect((await sn.update({ name: 'n1', labels: { b: '3', c: '4' } }, ['labels.b', 'labels.a'])).labels).toEqual({
      b: '3'
    })
    expect((await sn.update({ name: 'n1', labels: { z: '9' } }, [])).labels).toEqual({ z: '9' })
    await expect(sn.update({ name: 'n1', labels: {} }, ['parent'])).rejects.toMatchObject({
      status: Status.INVALID_ARGUMENT
    })
    await sn.prepare('k2', 'n1', {})
    expect(sn.list(['kind==active']).map((i) => i.name)).toEqual(['k2'])
    expect(sn.list(['parent=="n1"', 'name==nothing']).map((i) => i.name)).toEqual(['k2'])
    expect(sn.list(['labels.z==9,kind==committed']).map((i) => i.name)).toEqual(['n1'])
    expect(sn.list(['labels."z"~=^9$']).map((i) => i.name)).toEqual(['n1'])
    expect(() => sn.list(['labels.z=="9'])).toThrow(expect.objectContaining({ status: Status.INVALID_ARGUMENT }))
  })

  it('keeps its records across a restart and counts disk usage', async () => {
    const [m] = await sn.prepare('k', '', {})
    await writeFile(join(m!.source, 'f'), Buffer.alloc(10_000))
    await sn.commit('n', 'k', { l: 'v' })
    await sn.close()
    sn = await open()
    expect(sn.stat('n')).toMatchObject({ name: 'n', kind: 'committed', labels: { l: 'v' } })
    const usage = await sn.usage('n')
    expect(usage.inodes).toBe(2)
    expect(usage.size).toBeGreaterThanOrEqual(10_000)
  })

  it('cleans up directories no record owns', async () => {
    await sn.prepare('k', '', {})
    await mkdir(join(root, 'snapshots', '999', 'fs'), { recursive: true })
    await sn.cleanup()
    expect(await readdir(join(root, 'snapshots'))).toEqual(['1'])
  })

  it('commits a remote snapshot named by the chain ID when the labels name the image and layer', async () => {
    await expect(sn.prepare('k8s.io/1/extract-0', '', criLabels(0))).rejects.toMatchObject({
      status: Status.ALREADY_EXISTS
    })
    const info = sn.stat(CHAIN[0]!)
    expect(info).toMatchObject({ kind: 'committed', parent: '' })
    expect(info.labels[REMOTE_LABEL]).toBe('true')
    expect(info.labels[CRI_LABELS.layerDigest]).toBe(LAYERS[0])
    // What containerd then lists to find it.
    const filter = `labels."containerd.io/snapshot.ref"==${CHAIN[0]},parent==""`
    expect(sn.list([filter]).map((i) => i.name)).toEqual([CHAIN[0]])
    // The image was opened by the manifest digest containerd pulled, not by the tag.
    expect(source.opened[0]).toBe(`${REF}@${MANIFEST}`)

    await expect(sn.prepare('k8s.io/2/extract-1', CHAIN[0]!, criLabels(1))).rejects.toMatchObject({
      status: Status.ALREADY_EXISTS
    })
    expect(sn.stat(CHAIN[1]!)).toMatchObject({ parent: CHAIN[0] })
    expect(await sn.usage(CHAIN[1]!)).toEqual({ size: 10, inodes: 1 })
    // Prepared again (another pull of the image): there already.
    await expect(sn.prepare('k8s.io/3/extract-1', CHAIN[0]!, criLabels(1))).rejects.toMatchObject({
      status: Status.ALREADY_EXISTS
    })
    // The records survive a restart.
    await sn.close()
    sn = await open()
    expect(sn.stat(CHAIN[1]!).labels[REMOTE_LABEL]).toBe('true')
  })

  it('unpacks a layer when its labels do not check against the image', async () => {
    // The chain ID does not match the layer's place in the image.
    const wrong = { ...criLabels(1), [SNAPSHOT_REF_LABEL]: sha('other') }
    const mounts = await sn.prepare('k8s.io/1/extract', '', wrong)
    expect(mounts[0]!.type).toBe('bind')
    // Layer 1 on no parent: its chain sits on layer 0.
    expect((await sn.prepare('k8s.io/2/extract', '', criLabels(1)))[0]!.type).toBe('bind')
    // A layer the image does not have.
    expect(
      (await sn.prepare('k8s.io/3/extract', '', { ...criLabels(0), [CRI_LABELS.layerDigest]: sha('x') }))[0]!.type
    ).toBe('bind')
    expect(sn.list([]).filter((i) => i.labels[REMOTE_LABEL] !== undefined)).toEqual([])
  })

  it('reads stargz-snapshotter labels too (ctr-remote), on a parent unpacked locally', async () => {
    await sn.prepare('ns/1/extract', '', { [SNAPSHOT_REF_LABEL]: CHAIN[0]! })
    await sn.commit(`ns/2/${CHAIN[0]}`, 'ns/1/extract', { [SNAPSHOT_REF_LABEL]: CHAIN[0]! })
    const labels = {
      [SNAPSHOT_REF_LABEL]: CHAIN[1]!,
      [STARGZ_LABELS.reference]: REF,
      [STARGZ_LABELS.digest]: LAYERS[1]!
    }
    await expect(sn.prepare('ns/3/extract', `ns/2/${CHAIN[0]}`, labels)).rejects.toMatchObject({
      status: Status.ALREADY_EXISTS
    })
    expect(sn.stat(CHAIN[1]!).parent).toBe(`ns/2/${CHAIN[0]}`)
    expect(source.opened).toEqual([REF])
  })

  it('serves the API over gRPC with containerd status codes', async () => {
    const socket = join(root, '..', 'sn.sock')
    const server = await serveSnapshots(sn, socket)
    const def = loadSync('containerd/snapshots.proto', {
      includeDirs: [new URL('../proto', import.meta.url).pathname],
      keepCase: true,
      longs: Number,
      enums: String,
      defaults: true
    })
    // biome-ignore lint/suspicious/noExplicitAny: generated from the .proto at run time
    const Snapshots = (loadPackageDefinition(def) as any).containerd.services.snapshots.v1.Snapshots
    const client = new Snapshots(`unix:${socket}`, credentials.createInsecure())
    const call = <T>(method: string, req: object) =>
      new Promise<T>((resolve, reject) =>
        client[method](req, (err: ServiceError | null, res: T) => (err !== null ? reject(err) : resolve(res)))
      )
    try {
      await expect(call('Stat', { key: 'nope' })).rejects.toMatchObject({ code: Status.NOT_FOUND })
      const prepared = await call<{ mounts: Array<{ type: string }> }>('Prepare', { key: 'a', parent: '', labels: {} })
      expect(prepared.mounts[0]!.type).toBe('bind')
      await expect(call('Prepare', { key: 'r', parent: '', labels: criLabels(0) })).rejects.toMatchObject({
        code: Status.ALREADY_EXISTS
      })
      const { info } = await call<{ info: { kind: string; labels: Record<string, string> } }>('Stat', { key: CHAIN[0] })
      expect(info.kind).toBe('COMMITTED')
      const listed: string[] = []
      await new Promise<void>((resolve, reject) => {
        const stream = client.List({ filters: [] })
        stream.on('data', (r: { info: Array<{ name: string }> }) => listed.push(...r.info.map((i) => i.name)))
        stream.on('end', resolve)
        stream.on('error', reject)
      })
      expect(listed.sort()).toEqual([CHAIN[0], 'a'].sort())
      expect(await call('Usage', { key: 'a' })).toMatchObject({ inodes: 1 })
      await call('Remove', { key: 'a' })
      await call('Cleanup', {})
    } finally {
      client.close()
      await server.close()
    }
  })
})

describe('labels and filters', () => {
  it('computes chain IDs as containerd does', () => {
    expect(chainIds(['sha256:a'])).toEqual(['sha256:a'])
    expect(chainIds(['sha256:a', 'sha256:b'])[1]).toBe(sha('sha256:a sha256:b'))
  })

  it('takes the image and layer from CRI labels first, then stargz labels', () => {
    expect(remoteRequest(criLabels(0))).toEqual({ target: CHAIN[0], ref: REF, layer: LAYERS[0], manifest: MANIFEST })
    expect(
      remoteRequest({ [SNAPSHOT_REF_LABEL]: 'c', [STARGZ_LABELS.reference]: 'r', [STARGZ_LABELS.digest]: 'd' })
    ).toEqual({ target: 'c', ref: 'r', layer: 'd' })
    // Plain ctr pull: a target, nothing about the image.
    expect(
      remoteRequest({ [SNAPSHOT_REF_LABEL]: 'c', 'containerd.io/snapshot/stargz/toc.digest': 'x' })
    ).toBeUndefined()
  })

  it('parses quoted and bare values', () => {
    const info = { name: 'n', parent: 'p,q', kind: 'committed', labels: { 'a.b/c': 'x y', e: '' } }
    expect(parseFilters(['labels."a.b/c"=="x y"'])(info)).toBe(true)
    expect(parseFilters(['parent=="p,q"'])(info)).toBe(true)
    expect(parseFilters(['labels.e'])(info)).toBe(false)
    expect(parseFilters(['labels."a.b/c"'])(info)).toBe(true)
    expect(parseFilters(['name!=n'])(info)).toBe(false)
    expect(parseFilters(['name~=/^n$/'])(info)).toBe(true)
    expect(parseFilters(['name==m', 'kind==committed'])(info)).toBe(true)
    expect(parseFilters([])(info)).toBe(true)
  })
})

describe('containerd config', () => {
  /** TOML lines without comments and indentation, in order. */
  const lines = (toml: string) =>
    toml
      .split('\n')
      .map((l) => l.replace(/#.*$/, '').trim())
      .filter((l) => l !== '')

  it('is what the DaemonSet ConfigMap shows, for containerd 1.x and 2.x', async () => {
    const yaml = await readFile(new URL('../../../deploy/k8s/daemonset.yaml', import.meta.url), 'utf8')
    const block = (key: string) => {
      const start = yaml.indexOf(`  ${key}: |\n`)
      const out: string[] = []
      for (const l of yaml.slice(start).split('\n').slice(1)) {
        if (l !== '' && !l.startsWith('    ')) break
        out.push(l)
      }
      return out.join('\n')
    }
    const socket = '/run/strata/snapshotter.sock'
    expect(lines(block('strata.toml'))).toEqual(lines(containerdConfig({ socket })))
    expect(lines(block('strata-v2.toml'))).toEqual(
      lines(containerdConfig({ socket, containerd: 2, root: '/var/lib/strata/snapshotter' }))
    )
  })
})
