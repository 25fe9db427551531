import { existsSync } from 'node:fs'
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildCli, type P2pdProcess, startP2pd } from '@test/cluster.js'
import { type CountingProxy, startCountingProxy } from '@test/counting-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { repoRoot, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Containerd, eventually, releaseP2pdMounts, startContainerd, strataMountsUnder } from './containerd.js'
import { buildRunnableImage, type RunnableImage } from './images.js'

const root = process.getuid?.() === 0
/** stargz-snapshotter's ctr, built by scripts/setup.sh from Debian's sources. */
const ctrRemote = process.env.STRATA_CTR_REMOTE ?? join(repoRoot, '.tools', 'ctr-remote', 'ctr-remote')

describe.runIf(root)('strata as containerd snapshotter, ctr', () => {
  let registry: TestRegistry
  let image: RunnableImage
  let lazy: RunnableImage
  let proxy: CountingProxy
  let dataDir: string
  let p2pd: P2pdProcess
  let containerd: Containerd
  const socket = () => join(dataDir, 'snapshotter.sock')

  beforeAll(async () => {
    await buildCli()
    registry = await startRegistry()
    image = await buildRunnableImage({
      registry: registry.host,
      repository: 'strata/plain',
      estargz: false,
      programs: ['sh', 'cat', 'ls', 'id', 'setpriv', 'sleep'],
      files: { 'etc/greeting': 'hello from strata\n' },
      copies: { 'usr/local/bin/suid-id': ['id', 0o4755] }
    })
    proxy = await startCountingProxy(registry.host)
    lazy = await buildRunnableImage({
      registry: registry.host,
      repository: 'strata/lazy',
      estargz: true,
      programs: ['sh', 'cat'],
      files: { 'etc/greeting': 'hello from a remote snapshot\n' }
    })
    dataDir = await mkdtemp(join(tmpdir(), 'strata-p2pd-'))
    p2pd = await startP2pd({ dataDir, insecureRegistry: [registry.host], args: ['--snapshotter-socket', socket()] })
    containerd = await startContainerd({ snapshotters: { strata: socket() } })
  })

  afterAll(async () => {
    await containerd?.stop()
    await p2pd?.stop()
    if (dataDir !== undefined) await releaseP2pdMounts(dataDir)
    await proxy?.stop()
    await registry?.stop()
    if (dataDir !== undefined) await rm(dataDir, { recursive: true, force: true })
  })

  it('pulls with plain ctr (no labels: layers unpacked by containerd) and runs a container', async () => {
    await containerd.ctr(['images', 'pull', '--plain-http', '--snapshotter', 'strata', image.ref])
    const { stdout } = await containerd.ctr([
      'run',
      '--rm',
      '--snapshotter',
      'strata',
      image.ref,
      'plain1',
      'cat',
      '/etc/greeting'
    ])
    expect(stdout).toBe('hello from strata\n')
    const { stdout: list } = await containerd.ctr(['snapshots', '--snapshotter', 'strata', 'ls'])
    // Two committed layers (named by containerd's metadata, which ends each name with the chain ID).
    expect(list.split('\n').filter((l) => /Committed/.test(l))).toHaveLength(2)
    // A setuid program of the image works for a user in the container.
    const { stdout: euid } = await containerd.ctr([
      'run',
      '--rm',
      '--allow-new-privs',
      '--snapshotter',
      'strata',
      image.ref,
      'plain2',
      'setpriv',
      '--reuid',
      '1000',
      '--regid',
      '1000',
      '--clear-groups',
      '/usr/local/bin/suid-id',
      '-u'
    ])
    expect(euid).toBe('0\n')
  })

  it.runIf(existsSync(ctrRemote))(
    'pulls remotely with ctr-remote rpull (stargz labels) and runs with plain ctr',
    async () => {
      const ref = lazy.ref.replace(registry.host, proxy.host)
      await run(ctrRemote, [
        '-a',
        containerd.socket,
        '-n',
        'strata-test',
        'images',
        'rpull',
        '--plain-http',
        '--snapshotter',
        'strata',
        ref
      ])
      // containerd fetched no layer: strata serves them.
      const layerGets = proxy.requests.filter(
        (r) => lazy.layers.some((d) => r.path.endsWith(`/blobs/${d}`)) && r.rangeStart === undefined
      )
      expect(layerGets).toEqual([])
      const { stdout } = await containerd.ctr([
        'run',
        '--rm',
        '--snapshotter',
        'strata',
        ref,
        'lazy1',
        'cat',
        '/etc/greeting'
      ])
      expect(stdout).toBe('hello from a remote snapshot\n')
      const { stdout: info } = await containerd.ctr(['snapshots', '--snapshotter', 'strata', 'ls'])
      expect(info.split('\n').filter((l) => /\sCommitted\s*$/.test(l)).length).toBeGreaterThanOrEqual(
        lazy.layers.length
      )
      // The container is gone (--rm): so is the merged root it ran on, once containerd's GC removed its snapshot.
      await eventually(async () => expect(await strataMountsUnder(join(dataDir, 'snapshotter'))).toEqual([]))
    }
  )

  it('takes the socket from the config file too, and serves it to root only', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'strata-p2pd-config-'))
    try {
      const path = join(dir, 'sn.sock')
      await writeFile(join(dir, 'config.json'), JSON.stringify({ 'snapshotter-socket': path }))
      const node = await startP2pd({ dataDir: dir, args: ['--config', join(dir, 'config.json')] })
      const st = await stat(path)
      expect(st.isSocket()).toBe(true)
      expect(st.mode & 0o777).toBe(0o600)
      expect(await node.stop()).toBe(0)
    } finally {
      await releaseP2pdMounts(dir)
      await rm(dir, { recursive: true, force: true })
    }
  })
})
