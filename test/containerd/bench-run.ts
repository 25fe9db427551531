// One measured start of the containerd benchmark (see bench-main.ts): a fresh containerd, fresh p2pd data
// directories, and the phases of the start timed from the outside (ctr, ctr-remote, CRI calls), with what the
// registry (behind the WAN emulator) sent during each.
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type P2pdProcess, startP2pd, waitForMesh } from '@test/cluster.js'
import { run } from '@test/tools.js'
import type { WanProxy } from '@test/wan-proxy.js'
import { criClient, sandboxConfig } from '../../packages/snapshotter/test/cri.js'
import { type Containerd, releaseP2pdMounts, startContainerd } from './containerd.js'

export const SCENARIOS = ['overlayfs', 'strata', 'lazy', 'warm peer', 'cri'] as const
export type Scenario = (typeof SCENARIOS)[number]

/** A timed step: seconds, and bytes the registry sent during it. */
export interface Phase {
  seconds: number
  registryBytes: number
}

export interface Sample {
  /** Pull to the first container's exit. */
  first: Phase
  /** Its parts, in order: pull, create, start (ctr) or PullImage, RunPodSandbox, ... (CRI). */
  phases: Record<string, Phase>
  /** A second container of the image just pulled (`ctr run` again), where the scenario has one. */
  second?: Phase
  /** A third container's create, start and rm, one call each (where a second container's time goes). */
  secondPhases?: Record<string, Phase>
}

export interface MeasureInit {
  wan: WanProxy
  ctrRemote: string
  /** Refs through the WAN: the gzip image and its eStargz conversion. */
  plain: string
  lazy: string
  /** The pod sandbox (pause) image, pulled before the clock starts (a node has it). */
  pause: string
  /** Registries p2pd and CRI reach over plain HTTP. */
  insecure: string[]
  id: string
  command: string[]
  output: string
}

/** Times `steps` one after the other against the WAN's byte counter. */
function clock(wan: WanProxy) {
  wan.reset()
  const started = performance.now()
  let at = started
  let bytes = 0
  const phases: Record<string, Phase> = {}
  return {
    async step<T>(name: string, f: () => Promise<T>): Promise<T> {
      const out = await f()
      const now = performance.now()
      phases[name] = { seconds: (now - at) / 1000, registryBytes: wan.bytesDown - bytes }
      at = now
      bytes = wan.bytesDown
      return out
    },
    total(): Phase {
      return { seconds: (at - started) / 1000, registryBytes: wan.bytesDown }
    },
    phases
  }
}

export async function measure(scenario: Scenario, m: MeasureInit): Promise<Sample> {
  const dirs: string[] = []
  const nodes: P2pdProcess[] = []
  let containerd: Containerd | undefined
  const node = async (bootstrap: string[] = []) => {
    const dataDir = await mkdtemp(join(tmpdir(), 'strata-bench-'))
    dirs.push(dataDir)
    const p = await startP2pd({
      dataDir,
      insecureRegistry: m.insecure,
      bootstrap,
      args: ['--snapshotter-socket', join(dataDir, 'snapshotter.sock')]
    })
    nodes.push(p)
    return p
  }
  try {
    let target: P2pdProcess | undefined
    if (scenario !== 'overlayfs') target = await node()
    if (scenario === 'warm peer') {
      const warm = await target!.p2pctl(['warm', m.lazy])
      if (warm.code !== 0) throw new Error(`warm failed: ${warm.stderr}`)
      target = await node(target!.addrs)
      await waitForMesh(nodes, 1)
    }
    const logs = scenario === 'cri' ? await mkdtemp(join(tmpdir(), 'strata-bench-pods-')) : undefined
    if (logs !== undefined) dirs.push(logs)
    containerd = await startContainerd({
      snapshotters: target !== undefined ? { strata: join(target.dataDir, 'snapshotter.sock') } : {},
      ...(scenario === 'cri' && { cri: { snapshotter: 'strata', sandboxImage: m.pause }, plainHttp: m.insecure })
    })
    if (scenario === 'cri') return await measureCri(containerd, m, logs!)
    const c = containerd
    const snapshotter = scenario === 'overlayfs' ? 'overlayfs' : 'strata'
    const remote = scenario === 'lazy' || scenario === 'warm peer'
    const ref = remote ? m.lazy : m.plain
    const check = (what: string, stdout: string) => {
      if (stdout.trim() !== m.output)
        throw new Error(`${scenario} ${what}: the container printed ${JSON.stringify(stdout)}`)
    }
    const ctrRun = async (id: string) =>
      (await c.ctr(['run', '--rm', '--snapshotter', snapshotter, ref, id, ...m.command], { timeout: 300_000 })).stdout
    const t = clock(m.wan)
    await t.step('pull', () =>
      remote
        ? run(m.ctrRemote, [
            '-a',
            c.socket,
            '-n',
            'strata-test',
            'images',
            'rpull',
            '--plain-http',
            '--snapshotter',
            snapshotter,
            ref
          ])
        : c.ctr(['images', 'pull', '--plain-http', '--snapshotter', snapshotter, ref], { timeout: 300_000 })
    )
    // The first container in two steps, to see where its time goes: `ctr run` is the same two calls.
    await t.step('create', () =>
      c.ctr(['containers', 'create', '--snapshotter', snapshotter, '--', ref, `${m.id}a`, ...m.command])
    )
    const started = await t.step('start', () => c.ctr(['tasks', 'start', `${m.id}a`], { timeout: 300_000 }))
    check('first container', started.stdout)
    const first = t.total()
    await c.ctr(['containers', 'rm', `${m.id}a`])
    const again = clock(m.wan)
    check('second container', await again.step('run', () => ctrRun(`${m.id}b`)))
    // A third in steps, to see where a second container's time goes (not in the figures: one ctr call more).
    const third = clock(m.wan)
    await third.step('create', () =>
      c.ctr(['containers', 'create', '--snapshotter', snapshotter, '--', ref, `${m.id}c`, ...m.command])
    )
    check('third container', (await third.step('start', () => c.ctr(['tasks', 'start', `${m.id}c`]))).stdout)
    await third.step('rm', () => c.ctr(['containers', 'rm', `${m.id}c`]))
    return { first, phases: t.phases, second: again.total(), secondPhases: third.phases }
  } finally {
    await containerd?.stop()
    for (const n of nodes) await n.stop()
    for (const d of dirs) {
      await releaseP2pdMounts(d)
      await rm(d, { recursive: true, force: true })
    }
  }
}

/** CRI, as the kubelet drives it: PullImage, RunPodSandbox (host network), CreateContainer, StartContainer, exit. */
async function measureCri(containerd: Containerd, m: MeasureInit, logs: string): Promise<Sample> {
  const cri = criClient(containerd.socket)
  try {
    // The sandbox image is on the node already, as on any node that ran a pod.
    await cri.image('PullImage', { image: { image: m.pause } })
    const sandbox = sandboxConfig('bench', logs)
    const t = clock(m.wan)
    await t.step('PullImage', () => cri.image('PullImage', { image: { image: m.lazy } }))
    const { pod_sandbox_id } = await t.step('RunPodSandbox', () =>
      cri.runtime<{ pod_sandbox_id: string }>('RunPodSandbox', { config: sandbox })
    )
    const { container_id } = await t.step('CreateContainer', () =>
      cri.runtime<{ container_id: string }>('CreateContainer', {
        pod_sandbox_id,
        config: {
          metadata: { name: m.id, attempt: 0 },
          image: { image: m.lazy },
          command: m.command,
          log_path: `${m.id}.log`
        },
        sandbox_config: sandbox
      })
    )
    const code = await t.step('StartContainer + exit', async () => {
      await cri.runtime('StartContainer', { container_id })
      const deadline = Date.now() + 300_000
      for (;;) {
        const { status } = await cri.runtime<{ status: { state: string; exit_code: number } }>('ContainerStatus', {
          container_id
        })
        if (status.state === 'CONTAINER_EXITED') return status.exit_code
        if (Date.now() > deadline) throw new Error(`cri: container ${container_id} still ${status.state}`)
        await new Promise((r) => setTimeout(r, 20))
      }
    })
    const first = t.total()
    // The CRI log format: time, stream, tag, text.
    const output = (await readFile(join(logs, `${m.id}.log`), 'utf8'))
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => l.split(' ').slice(3).join(' '))
      .join('\n')
    if (code !== 0 || output.trim() !== m.output) {
      throw new Error(`cri: the container exited ${code} and printed ${JSON.stringify(output)}`)
    }
    return { first, phases: t.phases }
  } finally {
    cri.close()
  }
}
