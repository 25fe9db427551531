import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { join } from 'node:path'
import { type Netns, startNetns } from '../helpers/netns.js'
import { startRegistry, type TestRegistry } from '../helpers/registry.js'
import { repoRoot } from '../helpers/tools.js'
import { startWanProxy, type WanProxy } from '../helpers/wan-proxy.js'
import type { Layout, Workload } from './images.js'
import { type Daemon, run, startDaemon, type Wrap } from './proc.js'

/**
 * Where a node's processes run: its address (p2pd listens there) and, in the netns lab, how a command is run
 * inside its network namespace.
 */
export interface Host {
  addr: string
  wrap?: Wrap
}

/** `loopback`: every node on 127.0.0.1, unshaped; `netns`: a network namespace and a tbf-shaped link per node. */
export type LabKind = 'loopback' | 'netns'

/**
 * The bench's world: a real registry behind the WAN emulator (every node reaches the registry through the
 * same emulated uplink; peers talk over loopback, or in the netns lab over their own shaped links), and the
 * operations it times, each run through the product's CLIs as separate processes.
 */
export interface Lab {
  registry: TestRegistry
  wan: WanProxy
  kind: LabKind
  /** Node `i` of a scenario runs on `host(i)`. */
  host(i: number): Host
  /** Scratch space of this run. */
  work: string
  signal: AbortSignal
  /** Progress lines for the operator (stderr). */
  log: (line: string) => void
  stop(): Promise<void>
}

export interface LabOptions {
  rttMs: number
  mbit: number
  kind: LabKind
  /** netns: the namespaces to create (the most nodes a scenario starts). */
  hosts: number
  /** netns: each node's link, Mbit/s each way. */
  nodeMbit: number
  work: string
  signal: AbortSignal
  log: (line: string) => void
}

export async function startLab(options: LabOptions): Promise<Lab> {
  await mkdir(options.work, { recursive: true })
  let netns: Netns | undefined
  let registry: TestRegistry | undefined
  try {
    if (options.kind === 'netns') {
      netns = await startNetns({ count: options.hosts, mbit: options.nodeMbit, log: options.log })
    }
    registry = await startRegistry()
    // In the netns lab the WAN listens on the bridge's address: the namespaces reach it there (and so does the
    // root namespace, where the full pulls and pushes run).
    const wan = await startWanProxy({
      target: registry.host,
      rttMs: options.rttMs,
      bitsPerSecond: options.mbit * 1_000_000,
      ...(netns !== undefined ? { listen: netns.gateway } : {})
    })
    const loopback: Host = { addr: '127.0.0.1' }
    const hosts: Host[] = netns?.hosts.map((h) => ({ addr: h.addr, wrap: h.wrap })) ?? []
    const reg = registry
    return {
      registry: reg,
      wan,
      kind: options.kind,
      host: (i) => (hosts.length > 0 ? hosts[i % hosts.length]! : loopback),
      work: options.work,
      signal: options.signal,
      log: options.log,
      async stop() {
        await wan.stop()
        await reg.stop()
        await netns?.stop()
      }
    }
  } catch (err) {
    await registry?.stop().catch(() => {})
    await netns?.stop()
    throw err
  }
}

const cli = (name: string) => join(repoRoot, 'packages', 'cli', 'bin', `${name}.js`)

/** Pushes an OCI layout to the registry directly (setting up is not measured); returns its ref through the WAN. */
export async function push(lab: Lab, layout: Layout, repository: string, tag: string): Promise<string> {
  await run(
    'skopeo',
    [
      'copy',
      '--quiet',
      '--dest-tls-verify=false',
      `oci:${layout.dir}:${layout.tag}`,
      `docker://${lab.registry.host}/${repository}:${tag}`
    ],
    { signal: lab.signal }
  )
  return `${lab.wan.host}/${repository}:${tag}`
}

/** The workload's command did not print what it should: the image (or the mount) is broken. */
export class WorkloadOutputError extends Error {
  override name = 'WorkloadOutputError'
  readonly code = 'ERR_BENCH_WORKLOAD_OUTPUT'
  constructor(workload: string, root: string, stdout: string, expected: string) {
    super(`${workload} in ${root} printed '${stdout.trim()}', not '${expected}'`)
  }
}

/** Runs the workload's command in `root` with chroot and checks what it printed. */
export async function runWorkload(lab: Lab, workload: Workload, root: string): Promise<void> {
  const { stdout } = await run('chroot', [root, ...workload.argv], {
    signal: lab.signal,
    ...(workload.stdin !== undefined ? { stdin: workload.stdin } : {}),
    env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root', LANG: 'C.UTF-8' }
  })
  if (stdout.trim() !== workload.stdout) throw new WorkloadOutputError(workload.name, root, stdout, workload.stdout)
}

/** One timed start: total milliseconds, its phases, and the registry's bytes sent meanwhile. */
export interface Timing {
  ms: number
  phases: Record<string, number>
  /** Bytes the registry sent (through the WAN) during the run. */
  egress: number
  /** A lazy start: the CPU time (user + sys, ms) of its p2p-mount process, from start to exit. */
  mountCpuMs?: number
}

/** Times `body`, which reports its phases by calling `mark(name)` at the end of each. */
export async function timed(lab: Lab, body: (mark: (phase: string) => void) => Promise<void>): Promise<Timing> {
  const egress0 = lab.wan.bytesDown
  const start = performance.now()
  let last = start
  const phases: Record<string, number> = {}
  await body((phase) => {
    const now = performance.now()
    phases[phase] = Math.round(now - last)
    last = now
  })
  return { ms: Math.round(performance.now() - start), phases, egress: lab.wan.bytesDown - egress0 }
}

/**
 * Full pull, what a runtime does without lazy pulling: download every layer through the WAN
 * (`skopeo copy` to an OCI layout), extract each with tar into a directory, run the command there.
 */
export async function fullPull(lab: Lab, ref: string, workload: Workload, dir: string): Promise<Timing> {
  try {
    return await timed(lab, async (mark) => {
      const oci = await download(lab, ref, dir)
      mark('download')
      const rootfs = await extract(lab, oci, dir)
      mark('extract')
      await runWorkload(lab, workload, rootfs)
      mark('run')
    })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/**
 * Running from a local extracted copy, what a node that pulled the image before does: pull and extract (not
 * timed), drop the page cache, then time the command in the copy.
 */
export async function extractedRun(lab: Lab, ref: string, workload: Workload, dir: string): Promise<Timing> {
  try {
    const rootfs = await extract(lab, await download(lab, ref, dir), dir)
    await dropCaches()
    return await timed(lab, async (mark) => {
      await runWorkload(lab, workload, rootfs)
      mark('run')
    })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** Empties the kernel's page cache (root), so a start reads its files from disk as after a reboot. */
export async function dropCaches(): Promise<void> {
  await run('sync', [])
  await writeFile('/proc/sys/vm/drop_caches', '3\n')
}

/** `skopeo copy` of the image through the WAN into an OCI layout under `dir`; returns the layout. */
async function download(lab: Lab, ref: string, dir: string): Promise<string> {
  const oci = join(dir, 'oci')
  await mkdir(dir, { recursive: true })
  await run('skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${ref}`, `oci:${oci}:latest`], {
    signal: lab.signal
  })
  return oci
}

/** Extracts every layer of the OCI layout, in order, into `dir`/rootfs; returns that directory. */
async function extract(lab: Lab, oci: string, dir: string): Promise<string> {
  const rootfs = join(dir, 'rootfs')
  await mkdir(rootfs, { recursive: true })
  const index = JSON.parse(await readFile(join(oci, 'index.json'), 'utf8')) as {
    manifests: Array<{ digest: string }>
  }
  const blob = (digest: string) => join(oci, 'blobs', 'sha256', digest.replace('sha256:', ''))
  const manifest = JSON.parse(await readFile(blob(index.manifests[0]!.digest), 'utf8')) as {
    layers: Array<{ digest: string }>
  }
  for (const layer of manifest.layers) {
    await run('tar', ['-xzf', blob(layer.digest), '-C', rootfs, '--numeric-owner'], { signal: lab.signal })
  }
  return rootfs
}

/**
 * A running `p2p-mount IMAGE MOUNTPOINT --writable`: served by the p2pd answering on `socket` (its store, its
 * peers), or without one by p2p-mount itself with its own store in `dataDir` (the socket is then a path in
 * `dataDir` where nothing answers, so a p2pd on the default socket cannot serve it).
 */
export async function mount(
  lab: Lab,
  ref: string,
  mountpoint: string,
  dataDir: string,
  options: { record?: string; socket?: string; host?: number } = {}
): Promise<Daemon> {
  await mkdir(mountpoint, { recursive: true })
  const socket = options.socket ?? join(dataDir, 'no-p2pd.sock')
  const args = [cli('p2p-mount'), ref, mountpoint, '--data-dir', dataDir, '--socket', socket, '--writable']
  if (options.record !== undefined) args.push('--record', options.record)
  // Loopback registries are plain HTTP to p2p-mount anyway; the netns lab's WAN is on the bridge's address.
  if (options.socket === undefined && lab.kind === 'netns') args.push('--insecure-registry', lab.wan.host)
  const wrap = lab.host(options.host ?? 0).wrap
  return startDaemon(process.execPath, args, /^mounted .* at /, {
    signal: lab.signal,
    timeout: 300_000,
    ...(wrap !== undefined ? { wrap } : {})
  })
}

/** Stops a p2p-mount and checks that it unmounted cleanly. */
export async function unmount(mounted: Daemon, mountpoint: string): Promise<void> {
  const code = await mounted.stop()
  if (code !== 0) {
    await run(process.execPath, [cli('p2p-mount'), '--unmount', mountpoint]).catch(() => {})
    throw new Error(`p2p-mount of ${mountpoint} exited with ${code}: ${mounted.stderr().trim()}`)
  }
}

/**
 * Lazy start: mount the image with p2p-mount (cold unless the store was filled before; through the p2pd on
 * `socket` when given), run the command in the mount. The clock stops when the command is done; the egress
 * counts until p2p-mount has exited (its background prefetch included).
 */
export async function lazyStart(
  lab: Lab,
  ref: string,
  workload: Workload,
  dataDir: string,
  options: { record?: string; socket?: string; host?: number } = {}
): Promise<Timing> {
  const mountpoint = join(dataDir, 'mnt')
  const egress0 = lab.wan.bytesDown
  let mounted: Daemon | undefined
  try {
    const timing = await timed(lab, async (mark) => {
      mounted = await mount(lab, ref, mountpoint, dataDir, options)
      mark('mount')
      await runWorkload(lab, workload, mountpoint)
      mark('run')
    })
    const m = mounted!
    await unmount(m, mountpoint)
    mounted = undefined
    const cpu = m.cpuMs()
    return { ...timing, egress: lab.wan.bytesDown - egress0, ...(cpu !== undefined ? { mountCpuMs: cpu } : {}) }
  } finally {
    await mounted?.stop()
  }
}

/** One p2pd process (on loopback, or in its host's namespace) with its own data dir and control socket. */
export interface Node {
  peerId: string
  addrs: string[]
  dataDir: string
  socket: string
  daemon: Daemon
}

export async function startNode(lab: Lab, dataDir: string, bootstrap: string[] = [], host = 0): Promise<Node> {
  await mkdir(dataDir, { recursive: true })
  const { addr, wrap } = lab.host(host)
  const socket = join(dataDir, 'p2pd.sock')
  const args = [
    cli('p2pd'),
    '--data-dir',
    dataDir,
    '--listen',
    `/ip4/${addr}/tcp/0`,
    '--socket',
    socket,
    '--insecure-registry',
    lab.wan.host,
    ...bootstrap.flatMap((b) => ['--bootstrap', b])
  ]
  const daemon = await startDaemon(process.execPath, args, /^p2pd ready: /, {
    signal: lab.signal,
    timeout: 120_000,
    ...(wrap !== undefined ? { wrap } : {})
  })
  const m = /^p2pd ready: peer (\S+) listening on (.*), socket /.exec(daemon.line)
  if (m === null) {
    await daemon.stop()
    throw new Error(`p2pd printed an unexpected ready line: ${daemon.line}`)
  }
  return { peerId: m[1]!, addrs: m[2]!.split(', '), dataDir, socket, daemon }
}

/**
 * The most memory the node's p2pd has held so far (VmHWM, its peak resident set, bytes); undefined once it exited
 * or where /proc does not say.
 */
export async function peakRss(node: Node): Promise<number | undefined> {
  const pid = node.daemon.proc.pid
  if (pid === undefined || node.daemon.proc.exitCode !== null) return undefined
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '')
  const kb = /^VmHWM:\s+(\d+) kB/m.exec(status)?.[1]
  return kb === undefined ? undefined : Number(kb) * 1024
}

/** What p2pd's /status counts of chunk bytes (see NodeStatus in packages/node). */
export interface NodeBytes {
  /** Sent to peers. */
  served: number
  /** Fetched for the node's own reads, per source (`peer`, `registry`, `store`). */
  fetched: Record<string, number>
  /** Fetched as the home of peers' chunks, per source. */
  fetchedForPeers: Record<string, number>
}

/** The node's chunk byte counters; undefined when p2pd did not answer. */
export async function nodeBytes(node: Node): Promise<NodeBytes | undefined> {
  return control<{ bytes: NodeBytes }>(node, '/status')
    .then((s) => s.bytes)
    .catch(() => undefined)
}

/** Stops a p2pd; a non-zero exit is a failure of the product, reported with its stderr. */
export async function stopNode(node: Node): Promise<void> {
  const code = await node.daemon.stop()
  if (code !== 0) throw new Error(`p2pd in ${node.dataDir} exited with ${code}: ${node.daemon.stderr().trim()}`)
}

/** `p2pctl ARGS --socket <node's socket> --json`, parsed. */
export async function p2pctl<T>(lab: Lab, node: Node, args: string[]): Promise<T> {
  const { stdout } = await run(process.execPath, [cli('p2pctl'), ...args, '--socket', node.socket, '--json'], {
    signal: lab.signal,
    timeout: 1_800_000
  })
  return JSON.parse(stdout) as T
}

/** A GET on p2pd's control API (for waiting on the cluster, not timed: no process start per poll). */
function control<T>(node: Node, path: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: node.socket, path, timeout: 10_000 }, (res) => {
      let body = ''
      res.setEncoding('utf8').on('data', (d: string) => {
        body += d
      })
      res.once('end', () => {
        try {
          resolve(JSON.parse(body) as T)
        } catch (err) {
          reject(err)
        }
      })
    })
    req.once('timeout', () => req.destroy(new Error(`p2pd at ${node.socket} did not answer ${path} in 10 s`)))
    req.once('error', reject)
    req.end()
  })
}

/** Polls until `check` holds for every node (default 60 s). */
async function waitFor(
  nodes: Node[],
  what: string,
  check: (node: Node) => Promise<boolean>,
  timeoutMs = 60_000
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const ok = await Promise.all(nodes.map(check))
    if (ok.every(Boolean)) return
    if (Date.now() > deadline) throw new Error(`${what}: not after ${timeoutMs / 1000} s (${ok.join(', ')})`)
    await new Promise((r) => setTimeout(r, 250))
  }
}

/**
 * Waits (up to 2 minutes) until every node sees every other as a strata peer, as an operator's cluster would
 * after a while. When that does not happen, settles for a cluster formed around the first node (it sees every
 * other, each sees at least one: the first node runs the cluster warm-up, and providers are found through
 * the DHT). Resolves with the fewest strata peers any node sees, for the report.
 */
export async function waitForCluster(lab: Lab, nodes: Node[]): Promise<number> {
  const strataPeers = async (n: Node) =>
    (await control<Array<{ strata: boolean }>>(n, '/peers')).filter((p) => p.strata).length
  const all = nodes.length - 1
  try {
    await waitFor(nodes, `a full mesh of ${nodes.length} p2pd`, async (n) => (await strataPeers(n)) >= all, 120_000)
  } catch {
    await waitFor(nodes, `a cluster of ${nodes.length} p2pd around ${nodes[0]?.peerId}`, async (n) =>
      n === nodes[0] ? (await strataPeers(n)) >= all : (await strataPeers(n)) >= 1
    )
  }
  const fewest = Math.min(...(await Promise.all(nodes.map(strataPeers))))
  if (fewest < all)
    lab.log(`the ${nodes.length} p2pd did not all connect: the fewest strata peers of a node is ${fewest}`)
  return fewest
}

/** Waits until the node's coarse keys (layer and TOC digests) landed on the DHT: peers can find it. */
export function waitForAnnounced(node: Node, keys: number): Promise<void> {
  return waitFor([node], `${keys} announcements of ${node.peerId} landed`, async (n) => {
    const status = await control<{ announce: { landed: number } }>(n, '/status')
    return status.announce.landed >= keys
  })
}
