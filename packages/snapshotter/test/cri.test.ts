// CRI (what the kubelet drives) on a real containerd 1.6 with strata as its snapshotter: CRI passes the image
// and layer of every unpack as labels, so eStargz layers become remote snapshots, served by merged-root FUSE
// mounts, and containerd downloads no layer blob.
import { randomBytes } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildCli, type P2pdProcess, startP2pd, waitForMesh } from '@test/cluster.js'
import { type CountingProxy, startCountingProxy } from '@test/counting-proxy.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  type Containerd,
  eventually,
  releaseP2pdMounts,
  startContainerd,
  strataMountsUnder
} from '../../../test/containerd/containerd.js'
import { buildRunnableImage, type RunnableImage } from '../../../test/containerd/images.js'
import { type Cri, criClient, sandboxConfig } from './cri.js'

const root = process.getuid?.() === 0

describe.runIf(root)('strata as containerd snapshotter, CRI', () => {
  let registry: TestRegistry
  let proxy: CountingProxy
  let app: RunnableImage
  let pause: RunnableImage
  let plain: RunnableImage
  let dataDir: string
  let logs: string
  let p2pd: P2pdProcess
  let containerd: Containerd
  let cri: Cri
  const socket = () => join(dataDir, 'snapshotter.sock')
  const viaProxy = (ref: string) => ref.replace(registry.host, proxy.host)

  beforeAll(async () => {
    await buildCli()
    registry = await startRegistry()
    proxy = await startCountingProxy(registry.host)
    const programs = ['sh', 'cat', 'ls', 'id', 'setpriv', 'sleep']
    ;[app, pause, plain] = await Promise.all([
      buildRunnableImage({
        registry: registry.host,
        repository: 'strata/app',
        estargz: true,
        programs,
        // A big file nobody reads: a layer read whole would show in the registry's log.
        files: { 'etc/greeting': 'hello from a lazy layer\n', 'data/unread': randomBytes(3 << 20).toString('base64') },
        copies: { 'usr/local/bin/suid-id': ['id', 0o4755] },
        prioritized: ['etc/greeting', 'usr/bin/cat']
      }),
      buildRunnableImage({
        registry: registry.host,
        repository: 'strata/pause',
        estargz: true,
        programs: ['sleep'],
        entrypoint: ['/usr/bin/sleep', 'infinity']
      }),
      buildRunnableImage({
        registry: registry.host,
        repository: 'strata/plain',
        estargz: false,
        programs: ['cat'],
        files: { 'etc/greeting': 'hello from a plain layer\n' }
      })
    ])
    dataDir = await mkdtemp(join(tmpdir(), 'strata-p2pd-'))
    logs = await mkdtemp(join(tmpdir(), 'strata-pods-'))
    p2pd = await startP2pd({ dataDir, insecureRegistry: [proxy.host], args: ['--snapshotter-socket', socket()] })
    containerd = await startContainerd({
      snapshotters: { strata: socket() },
      cri: { snapshotter: 'strata', sandboxImage: viaProxy(pause.ref) },
      plainHttp: [proxy.host]
    })
    cri = criClient(containerd.socket)
  })

  afterAll(async () => {
    cri?.close()
    await containerd?.stop()
    await p2pd?.stop()
    // p2pd leaves its merged roots to the FUSE session holder when it stops: unmounted, the holder exits.
    if (dataDir !== undefined) await releaseP2pdMounts(dataDir)
    await proxy?.stop()
    await registry?.stop()
    for (const d of [dataDir, logs]) if (d !== undefined) await rm(d, { recursive: true, force: true })
  })

  /** Creates and starts a container of `image` running `command`; resolves with its id. */
  async function startContainer(
    sandbox: string,
    name: string,
    image: string,
    command: string[],
    user?: number
  ): Promise<string> {
    const config = {
      metadata: { name, attempt: 0 },
      image: { image },
      command,
      log_path: `${name}.log`,
      ...(user !== undefined && { linux: { security_context: { run_as_user: { value: user } } } })
    }
    const { container_id } = await cri.runtime<{ container_id: string }>('CreateContainer', {
      pod_sandbox_id: sandbox,
      config,
      sandbox_config: sandboxConfig('pod', logs)
    })
    await cri.runtime('StartContainer', { container_id })
    return container_id
  }

  async function waitExited(id: string): Promise<number> {
    const deadline = Date.now() + 30_000
    for (;;) {
      const { status } = await cri.runtime<{ status: { state: string; exit_code: number } }>('ContainerStatus', {
        container_id: id
      })
      if (status.state === 'CONTAINER_EXITED') return status.exit_code
      if (Date.now() > deadline) throw new Error(`container ${id} still ${status.state}`)
      await new Promise((r) => setTimeout(r, 100))
    }
  }

  /** The container's output lines (CRI log format: time, stream, tag, text). */
  async function output(name: string): Promise<string> {
    const text = await readFile(join(logs, `${name}.log`), 'utf8')
    return text
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => l.split(' ').slice(3).join(' '))
      .join('\n')
  }

  async function committedSnapshots(): Promise<string[]> {
    const { stdout } = await containerd.ctr(['snapshots', '--snapshotter', 'strata', 'ls'], { ns: 'k8s.io' })
    return stdout
      .split('\n')
      .filter((l) => /\sCommitted\s*$/.test(l))
      .map((l) => l.split(/\s+/)[0]!)
  }

  it('pulls an eStargz image lazily and runs a container from remote snapshots', async () => {
    const ref = viaProxy(app.ref)
    const pulled = await cri.image<{ image_ref: string }>('PullImage', { image: { image: ref } })
    expect(pulled.image_ref).toMatch(/^sha256:/)
    const { pod_sandbox_id: sandbox } = await cri.runtime<{ pod_sandbox_id: string }>('RunPodSandbox', {
      config: sandboxConfig('pod', logs)
    })
    const id = await startContainer(sandbox, 'greet', ref, ['cat', '/etc/greeting'])
    expect(await waitExited(id)).toBe(0)
    expect(await output('greet')).toBe('hello from a lazy layer')

    // Every layer is a remote snapshot; the merged roots of the app and the pause image are mounted.
    const committed = await committedSnapshots()
    expect(committed).toHaveLength(app.layers.length + pause.layers.length)
    for (const key of committed) {
      const { stdout } = await containerd.ctr(['snapshots', '--snapshotter', 'strata', 'info', key], { ns: 'k8s.io' })
      expect(JSON.parse(stdout).Labels).toMatchObject({ 'containerd.io/snapshot/strata.remote': 'true' })
    }
    expect(await strataMountsUnder(join(dataDir, 'snapshotter'))).toHaveLength(2)

    // containerd and strata read manifests, configs and ranges: no layer blob was served whole.
    const layers = new Map([...app.layers, ...pause.layers].map((d, i) => [d, [...app.sizes, ...pause.sizes][i]!]))
    const whole = proxy.requests.filter((r) => {
      const digest = /\/blobs\/(sha256:[0-9a-f]{64})/.exec(r.path)?.[1]
      if (digest === undefined || !layers.has(digest) || r.method !== 'GET') return false
      return r.rangeStart === undefined || (r.rangeStart === 0 && (r.rangeEnd ?? Infinity) >= layers.get(digest)! - 1)
    })
    expect(whole).toEqual([])
    // The first container of the image had its eStargz layers' prioritized files prefetched.
    await eventually(async () => expect(p2pd.stderr()).toMatch(/prefetched the prioritized files of/))

    await cri.runtime('RemoveContainer', { container_id: id })
    await cri.runtime('StopPodSandbox', { pod_sandbox_id: sandbox })
    await cri.runtime('RemovePodSandbox', { pod_sandbox_id: sandbox })
  })

  it('shares one mount between the containers of an image, and removes it with the last of them', async () => {
    const ref = viaProxy(app.ref)
    const { pod_sandbox_id: sandbox } = await cri.runtime<{ pod_sandbox_id: string }>('RunPodSandbox', {
      config: sandboxConfig('pod', logs)
    })
    const a = await startContainer(sandbox, 'a', ref, ['sleep', '600'])
    const b = await startContainer(sandbox, 'b', ref, ['sleep', '600'])
    const mounts = await strataMountsUnder(join(dataDir, 'snapshotter'))
    expect(mounts).toHaveLength(2)
    // Both containers' root file systems are overlays on the same merged root.
    const overlays = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => / - overlay /.test(l))
    const on = (m: string) => overlays.filter((l) => l.includes(`lowerdir=${m},`) || l.endsWith(`lowerdir=${m}`))
    expect(mounts.map((m) => on(m).length).sort()).toEqual([1, 2])
    // The merged roots allow setuid programs and devices (p2p-mount's are nosuid,nodev).
    const info = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n')
    for (const m of mounts) {
      const options = info
        .find((l) => l.split(' ')[4] === m)!
        .split(' ')[5]!
        .split(',')
      expect(options).toContain('ro')
      expect(options).not.toContain('nosuid')
      expect(options).not.toContain('nodev')
    }

    // A setuid program of the image works for a user of the container (the mounts are not nosuid).
    const suid = await startContainer(sandbox, 'suid', ref, ['/usr/local/bin/suid-id', '-u'], 1000)
    expect(await waitExited(suid)).toBe(0)
    expect(await output('suid')).toBe('0')
    await cri.runtime('RemoveContainer', { container_id: suid })

    for (const id of [a, b]) {
      await cri.runtime('StopContainer', { container_id: id, timeout: 1 })
      await cri.runtime('RemoveContainer', { container_id: id })
    }
    await cri.runtime('StopPodSandbox', { pod_sandbox_id: sandbox })
    await cri.runtime('RemovePodSandbox', { pod_sandbox_id: sandbox })
    // containerd removes the containers' snapshots from strata when its garbage collector runs.
    await eventually(async () => expect(await strataMountsUnder(join(dataDir, 'snapshotter'))).toEqual([]))

    // Removing the image lets the garbage collector remove the image's snapshots too (Remove, then Cleanup).
    await cri.image('RemoveImage', { image: { image: ref } })
    await eventually(async () => expect(await committedSnapshots()).toHaveLength(pause.layers.length))
  })

  it('keeps its snapshots and the running containers when p2pd is killed, and starts new ones once it is back', async () => {
    const ref = viaProxy(app.ref)
    await cri.image('PullImage', { image: { image: ref } })
    const { pod_sandbox_id: sandbox } = await cri.runtime<{ pod_sandbox_id: string }>('RunPodSandbox', {
      config: sandboxConfig('pod', logs)
    })
    // It reads files of the image it never read before, after p2pd was killed: the reads wait for the next p2pd.
    const running = await startContainer(sandbox, 'running', ref, [
      'sh',
      '-c',
      'sleep 5; cat /data/unread > /dev/null && cat /etc/greeting; sleep 600'
    ])
    const list = async () =>
      (await containerd.ctr(['snapshots', '--snapshotter', 'strata', 'ls'], { ns: 'k8s.io' })).stdout.split('\n').sort()
    const before = await list()
    expect(before.filter((l) => /\sActive\s*$/.test(l))).toHaveLength(2)

    expect(await p2pd.stop('SIGKILL')).toBeNull()
    p2pd = await startP2pd({ dataDir, insecureRegistry: [proxy.host], args: ['--snapshotter-socket', socket()] })
    // containerd dials the plugin again on its next call (the first may fail while it reconnects).
    await eventually(async () => expect(await list()).toEqual(before))

    const after = await startContainer(sandbox, 'after', ref, ['cat', '/etc/greeting'])
    expect(await waitExited(after)).toBe(0)
    expect(await output('after')).toBe('hello from a lazy layer')
    // The container that ran through the restart kept its root file system.
    await eventually(async () => expect(await output('running')).toBe('hello from a lazy layer'))
    expect(p2pd.stderr()).toMatch(/snapshotter: serving layers 1-2 of .* again/)

    // A clean stop (SIGTERM: an upgrade) keeps them as well.
    const beforeStop = await list()
    expect(await p2pd.stop('SIGTERM')).toBe(0)
    p2pd = await startP2pd({ dataDir, insecureRegistry: [proxy.host], args: ['--snapshotter-socket', socket()] })
    await eventually(async () => expect(await list()).toEqual(beforeStop))
    const again = await startContainer(sandbox, 'again', ref, ['cat', '/etc/greeting'])
    expect(await waitExited(again)).toBe(0)
    expect(await output('again')).toBe('hello from a lazy layer')

    for (const id of [running, after, again]) {
      await cri.runtime('StopContainer', { container_id: id, timeout: 1 })
      await cri.runtime('RemoveContainer', { container_id: id })
    }
    await cri.runtime('StopPodSandbox', { pod_sandbox_id: sandbox })
    await cri.runtime('RemovePodSandbox', { pod_sandbox_id: sandbox })
  })

  it('starts a container on a second node with every chunk from the first: none from the registry', async () => {
    const ref = viaProxy(app.ref)
    // Node 1 holds every chunk of both images.
    for (const r of [ref, viaProxy(pause.ref)]) expect((await p2pd.p2pctl(['warm', r])).code).toBe(0)
    const dir2 = await mkdtemp(join(tmpdir(), 'strata-p2pd2-'))
    const node2 = await startP2pd({
      dataDir: dir2,
      insecureRegistry: [proxy.host],
      bootstrap: p2pd.addrs,
      args: ['--snapshotter-socket', join(dir2, 'snapshotter.sock')]
    })
    let containerd2: Containerd | undefined
    let cri2: Cri | undefined
    try {
      await waitForMesh([p2pd, node2], 1)
      containerd2 = await startContainerd({
        snapshotters: { strata: join(dir2, 'snapshotter.sock') },
        cri: { snapshotter: 'strata', sandboxImage: viaProxy(pause.ref) },
        plainHttp: [proxy.host]
      })
      cri2 = criClient(containerd2.socket)
      await cri2.image('PullImage', { image: { image: ref } })
      const { pod_sandbox_id: sandbox } = await cri2.runtime<{ pod_sandbox_id: string }>('RunPodSandbox', {
        config: sandboxConfig('pod2', logs)
      })
      const { container_id: id } = await cri2.runtime<{ container_id: string }>('CreateContainer', {
        pod_sandbox_id: sandbox,
        config: {
          metadata: { name: 'peer', attempt: 0 },
          image: { image: ref },
          command: ['cat', '/etc/greeting'],
          log_path: 'peer.log'
        },
        sandbox_config: sandboxConfig('pod2', logs)
      })
      await cri2.runtime('StartContainer', { container_id: id })
      const deadline = Date.now() + 30_000
      while (
        (await cri2.runtime<{ status: { state: string } }>('ContainerStatus', { container_id: id })).status.state !==
        'CONTAINER_EXITED'
      ) {
        if (Date.now() > deadline) throw new Error('the container on node 2 did not exit')
        await new Promise((r) => setTimeout(r, 100))
      }
      expect(await output('peer')).toBe('hello from a lazy layer')
      const status = await node2.client.get<{ bytes: { fetched: Record<string, number> } }>('/status')
      expect(status.bytes.fetched.registry).toBe(0)
      expect(status.bytes.fetched.peer).toBeGreaterThan(0)
      await cri2.runtime('RemoveContainer', { container_id: id })
      await cri2.runtime('StopPodSandbox', { pod_sandbox_id: sandbox })
      await cri2.runtime('RemovePodSandbox', { pod_sandbox_id: sandbox })
    } finally {
      cri2?.close()
      await containerd2?.stop()
      await node2.stop()
      await releaseP2pdMounts(dir2)
      await rm(dir2, { recursive: true, force: true })
    }
  })

  it('serves layers that are not eStargz remotely too: strata downloads them once and indexes them', async () => {
    const ref = viaProxy(plain.ref)
    await cri.image('PullImage', { image: { image: ref } })
    const { stdout } = await containerd.ctr(['content', 'ls', '-q'], { ns: 'k8s.io' })
    for (const layer of plain.layers) expect(stdout).not.toContain(layer)
    const { pod_sandbox_id: sandbox } = await cri.runtime<{ pod_sandbox_id: string }>('RunPodSandbox', {
      config: sandboxConfig('pod', logs)
    })
    const id = await startContainer(sandbox, 'plain', ref, ['cat', '/etc/greeting'])
    expect(await waitExited(id)).toBe(0)
    expect(await output('plain')).toBe('hello from a plain layer')
    await cri.runtime('RemoveContainer', { container_id: id })
    await cri.runtime('StopPodSandbox', { pod_sandbox_id: sandbox })
    await cri.runtime('RemovePodSandbox', { pod_sandbox_id: sandbox })
  })
})
