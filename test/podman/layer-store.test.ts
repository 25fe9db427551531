// podman 4.3 (containers-storage 1.43) pulls and runs an image through p2pd's additional layer store: it
// downloads no layer blob, the container's root is read lazily, and a second node reads from the first.
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildCli, type P2pdProcess, startP2pd } from '@test/cluster.js'
import { type CountingProxy, startCountingProxy } from '@test/counting-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildRunnableImage, type RunnableImage } from '../containerd/images.js'
import { type Podman, startPodman } from './podman.js'

const root = process.getuid?.() === 0
const podmanInstalled = await run('podman', ['--version']).then(
  () => true,
  () => false
)

interface NodeStatus {
  bytes: { fetched: Record<string, number> }
}

describe.runIf(root && podmanInstalled)('p2pd --layer-store: podman additional layer store', () => {
  let registry: TestRegistry
  let proxy: CountingProxy
  let image: RunnableImage
  let plain: RunnableImage
  let work: string
  const nodes: P2pdProcess[] = []
  const podmen: Podman[] = []
  const run1 = ['run', '--rm', '--network', 'none']

  beforeAll(async () => {
    await buildCli()
    registry = await startRegistry()
    proxy = await startCountingProxy(registry.host)
    image = await buildRunnableImage({
      registry: registry.host,
      repository: 'strata/podman',
      estargz: true,
      programs: ['sh', 'cat', 'ls'],
      hostDirs: ['/etc/default'],
      // The top layer deletes a file of the base and empties one of its directories: tar whiteouts, which the
      // store shows as overlay's and podman's overlay applies.
      files: {
        'etc/greeting': 'hello from the layer store\n',
        'etc/.wh.os-release': '',
        'etc/default/.wh..wh..opq': '',
        'etc/default/strata': 'only this\n'
      }
    })
    plain = await buildRunnableImage({
      registry: registry.host,
      repository: 'strata/podman-gzip',
      estargz: false,
      programs: ['sh', 'cat'],
      files: { 'etc/greeting': 'hello from a gzip image\n' }
    })
    work = await mkdtemp(join(tmpdir(), 'strata-podman-'))
  })

  afterAll(async () => {
    for (const p of podmen) await p.stop()
    for (const n of nodes) await n.stop()
    await proxy?.stop()
    await registry?.stop()
    if (work !== undefined) await rm(work, { recursive: true, force: true })
  })

  /** A p2pd with a layer store, and a podman whose storage.conf names it. */
  const startNode = async (i: number, bootstrap: string[]) => {
    const dataDir = join(work, `p2pd${i}`)
    const store = join(dataDir, 'layers')
    const node = await startP2pd({
      dataDir,
      insecureRegistry: [proxy.host],
      bootstrap,
      args: ['--layer-store', store]
    })
    nodes.push(node)
    const podman = await startPodman(join(work, `podman${i}`), store)
    podmen.push(podman)
    return { node, podman, store }
  }

  /** GETs of a layer blob that asked for all of it (no Range): a download. */
  const wholeLayerGets = () =>
    proxy.requests.filter((r) => image.layers.some((d) => r.path.endsWith(`/blobs/${d}`)) && r.rangeStart === undefined)

  it('pulls without downloading a layer and runs the image lazily', async () => {
    const { node, podman, store } = await startNode(0, [])
    const ref = image.ref.replace(registry.host, proxy.host)
    const { stdout: pulled, stderr } = await podman.podman(['pull', '--tls-verify=false', ref])
    expect(pulled.trim()).toMatch(/^[0-9a-f]{64}$/)
    // Every layer was found in the store: nobody downloaded one, and podman's layers are links to the store's.
    expect(wholeLayerGets()).toEqual([])
    const { stdout: links } = await run('bash', ['-c', `readlink ${work}/podman0/graph/overlay/*/diff || true`])
    const b64 = Buffer.from(ref).toString('base64')
    expect(links.trim().split('\n').sort()).toEqual(image.layers.map((d) => join(store, b64, d, 'diff')).sort())
    // The store answered podman's use and release notices as containers-storage asks (ENOENT): no warning.
    expect(stderr).not.toMatch(/Additional Layer Store/)
    expect(node.stderr()).toMatch(/layer store: podman uses /)

    // The layer directory podman linked: diff, info, blob, as containers-storage 1.43 reads them.
    const dir = join(store, Buffer.from(ref).toString('base64'), image.layers[1]!)
    const info = JSON.parse(await readFile(join(dir, 'info'), 'utf8')) as Record<string, unknown>
    expect(info).toMatchObject({ 'compressed-diff-digest': image.layers[1], 'compressed-size': image.sizes[1] })
    expect(info.compression).toBe(2)
    expect(await readFile(join(dir, 'diff', 'etc', 'greeting'), 'utf8')).toBe('hello from the layer store\n')

    const { stdout } = await podman.podman([
      ...run1,
      ref,
      'sh',
      '-c',
      'cat /etc/greeting; ls /etc/default; test -e /etc/os-release || echo whited out'
    ])
    expect(stdout).toBe('hello from the layer store\nstrata\nwhited out\n')
    expect(wholeLayerGets()).toEqual([])
    const status = await node.client.get<NodeStatus>('/status')
    expect(status.bytes.fetched.registry).toBeGreaterThan(0)
    expect(node.stderr()).toMatch(/layer store: opened /)

    // Removing the image lets the layers go: podman removes their directories, the store counts it.
    const removed = await podman.podman(['rmi', ref])
    expect(removed.stderr).not.toMatch(/Additional Layer Store/)
    expect(node.stderr()).toMatch(/layer store: podman released /)
  })

  it('serves a second node from the first: no chunk from the registry', async () => {
    const first = nodes[0]!
    // The first node holds every chunk (its run read some; a warm-up reads the rest) and announces them.
    const warm = await first.p2pctl(['warm', image.ref.replace(registry.host, proxy.host)])
    expect(warm.code).toBe(0)
    const { node, podman } = await startNode(1, first.addrs)
    const ref = image.ref.replace(registry.host, proxy.host)
    await podman.podman(['pull', '--tls-verify=false', ref])
    const { stdout } = await podman.podman([...run1, ref, 'sh', '-c', 'cat /etc/greeting; echo done'])
    expect(stdout).toBe('hello from the layer store\ndone\n')
    expect(wholeLayerGets()).toEqual([])
    const status = await node.client.get<NodeStatus>('/status')
    expect(status.bytes.fetched.peer).toBeGreaterThan(0)
    expect(status.bytes.fetched.registry ?? 0).toBe(0)
  })

  it('runs a gzip image too: p2pd downloads each layer once, podman none', async () => {
    const podman = podmen[0]!
    const ref = plain.ref.replace(registry.host, proxy.host)
    await podman.podman(['pull', '--tls-verify=false', ref])
    const { stdout } = await podman.podman([...run1, ref, 'cat', '/etc/greeting'])
    expect(stdout).toBe('hello from a gzip image\n')
    // Whole GETs (p2pd reads a layer's end by Range first, to tell eStargz from gzip): one per layer, p2pd's.
    const downloads = proxy.requests.filter(
      (r) => plain.layers.some((d) => r.path.endsWith(`/blobs/${d}`)) && r.rangeStart === undefined
    )
    expect(downloads.map((r) => r.path.slice(-71)).sort()).toEqual(plain.layers.slice().sort())
  })

  it('runs a pulled image again after p2pd is killed: the next p2pd remounts the store, answers the same paths', async () => {
    const [first, second] = nodes as [P2pdProcess, P2pdProcess]
    // Killed, it leaves the store mounted with nobody serving it.
    expect(await second.stop('SIGKILL')).toBe(null)
    const again = await startP2pd({
      dataDir: second.dataDir,
      insecureRegistry: [proxy.host],
      bootstrap: first.addrs,
      args: ['--layer-store', join(second.dataDir, 'layers')]
    })
    nodes[1] = again
    const ref = image.ref.replace(registry.host, proxy.host)
    const { stdout } = await podmen[1]!.podman([...run1, ref, 'cat', '/etc/greeting'])
    expect(stdout).toBe('hello from the layer store\n')
    expect(wholeLayerGets()).toEqual([])
    expect(again.stderr()).toMatch(/layer store: unmounted what was left mounted/)
  })

  it('pulls by digest too: another directory of the store, opened as the tag was', async () => {
    // The first podman removed the image: it pulls again, by digest.
    const pinned = `${proxy.host}/strata/podman@${image.digest}`
    const { stdout } = await podmen[0]!.podman([...run1, '--tls-verify=false', pinned, 'cat', '/etc/greeting'])
    expect(stdout).toBe('hello from the layer store\n')
    expect(nodes[0]!.stderr()).toContain(`layer store: opened ${pinned}`)
    expect(wholeLayerGets()).toEqual([])
  })

  it('has the layout of containers-storage 1.54+ too: layers keyed by TOC digest', async () => {
    // podman 5.1+ is not in Debian 12: the files it would read are checked here instead.
    const res = await fetch(`http://${registry.host}/v2/strata/podman/manifests/latest`, {
      headers: { accept: 'application/vnd.oci.image.manifest.v1+json' }
    })
    const manifest = (await res.json()) as {
      config: { digest: string }
      layers: { annotations: Record<string, string> }[]
    }
    const blob = await fetch(`http://${registry.host}/v2/strata/podman/blobs/${manifest.config.digest}`)
    const config = (await blob.json()) as { rootfs: { diff_ids: string[] } }
    const store = join(nodes[0]!.dataDir, 'layers')
    const ref = image.ref.replace(registry.host, proxy.host)
    const toc = manifest.layers[1]!.annotations['containerd.io/snapshot/stargz/toc.digest']!
    const dir = join(store, Buffer.from(ref).toString('base64'), toc)
    const info = JSON.parse(await readFile(join(dir, 'info'), 'utf8')) as Record<string, unknown>
    expect(info).toEqual({
      'compressed-size': image.sizes[1],
      'diff-size': expect.any(Number),
      compression: 2,
      'toc-digest': toc,
      flags: { 'expected-layer-diffid': config.rootfs.diff_ids[1] }
    })
    expect(await readFile(join(dir, 'diff', 'etc', 'default', 'strata'), 'utf8')).toBe('only this\n')
    // The blob is read by Range, as far as it is read.
    const { stdout: magic } = await run('bash', ['-c', `head -c 2 ${join(dir, 'blob')} | od -An -tx1`])
    expect(magic.trim()).toBe('1f 8b')
    expect(wholeLayerGets()).toEqual([])
  })
})
