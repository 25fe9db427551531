import { rm } from 'node:fs/promises'
import { join } from 'node:path'
import type { Workload } from './images.js'
import {
  dropCaches,
  extractedRun,
  fullPull,
  type Lab,
  lazyStart,
  type Node,
  type NodeBytes,
  nodeBytes,
  p2pctl,
  peakRss,
  startNode,
  stopNode,
  type Timing,
  timed,
  waitForAnnounced,
  waitForCluster
} from './lab.js'

/**
 * The four scenarios of the suite. Each returns raw timings; ratios against the baselines of the same run are
 * computed by the report. Every start is cold (a fresh data dir) unless the scenario says otherwise.
 */

interface WarmResult {
  totalChunks: number
  totalBytes: number
  layers: number
}
interface ClusterWarmResult {
  nodes: Record<string, { ok: boolean; error?: string }>
}

/**
 * Starts `n` p2pd nodes; with `cluster`, nodes 1..n-1 join through node 0 and the cluster is waited for
 * (`fewestPeers`: the fewest strata peers a node saw then; n - 1 is a full mesh).
 */
async function startNodes(
  lab: Lab,
  name: string,
  n: number,
  cluster: boolean
): Promise<{ nodes: Node[]; fewestPeers: number }> {
  const nodes: Node[] = []
  try {
    const first = await startNode(lab, join(lab.work, `${name}-0`), [], 0)
    nodes.push(first)
    const rest = await Promise.allSettled(
      Array.from({ length: n - 1 }, (_, i) =>
        startNode(lab, join(lab.work, `${name}-${i + 1}`), cluster ? first.addrs : [], i + 1)
      )
    )
    // Keep the nodes that started, to stop them, before failing on one that did not.
    for (const r of rest) if (r.status === 'fulfilled') nodes.push(r.value)
    const failed = rest.find((r) => r.status === 'rejected')
    if (failed !== undefined) throw failed.reason
    const fewestPeers = cluster ? await waitForCluster(lab, nodes) : 0
    return { nodes, fewestPeers }
  } catch (err) {
    await stopNodes(nodes)
    throw err
  }
}

/** Like Promise.all, but waits for every promise before failing: nothing of a scenario runs on after it. */
async function settled<T>(promises: Array<Promise<T>>): Promise<T[]> {
  const results = await Promise.allSettled(promises)
  const failed = results.find((r) => r.status === 'rejected')
  if (failed !== undefined) throw failed.reason
  return results.map((r) => (r as PromiseFulfilledResult<T>).value)
}

/** Adds `b`'s byte counters to `a`'s. */
function addBytes(a: NodeBytes, b: NodeBytes): NodeBytes {
  const add = (x: Record<string, number>, y: Record<string, number>) => {
    const out = { ...x }
    for (const [k, v] of Object.entries(y)) out[k] = (out[k] ?? 0) + v
    return out
  }
  return {
    served: a.served + b.served,
    fetched: add(a.fetched, b.fetched),
    fetchedForPeers: add(a.fetchedForPeers, b.fetchedForPeers)
  }
}

/**
 * Stops every node and removes its data dir; then fails if one of them did not exit cleanly. Returns what their
 * p2pd used: the largest peak RSS (read just before they stop), their CPU time summed (until they exited), and
 * their chunk byte counters summed (from /status, just before they stop).
 */
async function stopNodes(nodes: Node[]): Promise<P2pdMemory> {
  const peaks = (await Promise.all(nodes.map((n) => peakRss(n)))).filter((p) => p !== undefined)
  const bytes = (await Promise.all(nodes.map((n) => nodeBytes(n)))).filter((b) => b !== undefined)
  const stopped = await Promise.allSettled(nodes.map((n) => stopNode(n)))
  await Promise.all(nodes.map((n) => rm(n.dataDir, { recursive: true, force: true })))
  const failed = stopped.find((r) => r.status === 'rejected')
  if (failed !== undefined) throw failed.reason
  const cpus = nodes.map((n) => n.daemon.cpuMs())
  const usage: P2pdMemory = {}
  if (peaks.length > 0) usage.p2pdPeakRss = Math.max(...peaks)
  if (cpus.every((c) => c !== undefined)) usage.p2pdCpuMs = Math.round(cpus.reduce((a, b) => a + b, 0))
  if (bytes.length === nodes.length && bytes.length > 0) usage.p2pdBytes = bytes.reduce(addBytes)
  return usage
}

/**
 * What a scenario's p2pd used, when /proc and p2pd said: the largest peak RSS (bytes), CPU time (user + sys, ms,
 * from start to exit, all nodes summed) and chunk bytes (all nodes summed).
 */
export interface P2pdMemory {
  p2pdPeakRss?: number
  p2pdCpuMs?: number
  p2pdBytes?: NodeBytes
}

/** Runs `body` on the nodes, stops them, and adds what their p2pd used to its result. */
async function measuring<T extends object>(nodes: Node[], body: () => Promise<T>): Promise<T & P2pdMemory> {
  let result: T
  try {
    result = await body()
  } catch (err) {
    await stopNodes(nodes).catch(() => {})
    throw err
  }
  return { ...result, ...(await stopNodes(nodes)) }
}

async function warm(lab: Lab, node: Node, ref: string): Promise<WarmResult> {
  return p2pctl<WarmResult>(lab, node, ['warm', ref])
}

export interface ColdResult {
  full: Timing[]
  lazy: Timing[]
  profile: Timing[]
}

/**
 * 1. One node, cold: full pull vs lazy vs lazy with a recorded prefetch profile. The first lazy start records
 * what the workload reads (`p2p-mount --record`); `convertWithProfile` turns that into the profiled image.
 */
export async function cold(
  lab: Lab,
  workload: Workload,
  refs: { plain: string; esgz: string },
  runs: number,
  convertWithProfile: (record: string) => Promise<string>
): Promise<ColdResult> {
  const result: ColdResult = { full: [], lazy: [], profile: [] }
  const dir = (what: string, i: number) => join(lab.work, `${workload.name}-${what}-${i}`)
  let profiled: string | undefined
  for (let i = 0; i < runs; i++) {
    result.full.push(await fullPull(lab, refs.plain, workload, dir('full', i)))
    const record = i === 0 ? join(lab.work, `${workload.name}.files`) : undefined
    result.lazy.push(await lazyStart(lab, refs.esgz, workload, dir('lazy', i), record !== undefined ? { record } : {}))
    await rm(dir('lazy', i), { recursive: true, force: true })
    if (record !== undefined) profiled = await convertWithProfile(record)
    result.profile.push(await lazyStart(lab, profiled!, workload, dir('profile', i)))
    await rm(dir('profile', i), { recursive: true, force: true })
  }
  return result
}

export interface WarmPeerResult extends P2pdMemory {
  /** The peer's own `p2pctl warm` from the registry (setting up). */
  seed: Timing
  /** The node's start: p2p-mount through its cold p2pd, then the command. */
  start: Timing
  /** The same node again: its p2pd's store now holds what the command reads. */
  local?: Timing
  /** The baseline: the command in a local extracted copy of the image (already pulled), page cache dropped. */
  extracted?: Timing
}

/**
 * 2. One node with a warm peer (another p2pd ran `p2pctl warm IMAGE`): p2p-mount served by the node's p2pd;
 * then the same start with the image in the node's own store; against the command run in a local extracted
 * copy of the plain image (`plainRef`).
 */
export async function warmPeer(lab: Lab, workload: Workload, ref: string, plainRef: string): Promise<WarmPeerResult> {
  const extracted = await extractedRun(lab, plainRef, workload, join(lab.work, `${workload.name}-extracted`))
  const { nodes } = await startNodes(lab, `${workload.name}-peer`, 2, true)
  const [seedNode, node] = nodes as [Node, Node]
  return measuring(nodes, async () => {
    let layers = 0
    const seed = await timed(lab, async (mark) => {
      layers = (await warm(lab, seedNode, ref)).layers
      mark('warm')
    })
    // Peers find the seed by its coarse keys (a layer and a TOC digest per layer).
    await waitForAnnounced(seedNode, 2 * layers)
    const start = await lazyStart(lab, ref, workload, node.dataDir, { socket: node.socket, host: 1 })
    await dropCaches()
    const local = await lazyStart(lab, ref, workload, node.dataDir, { socket: node.socket, host: 1 })
    return { seed, start, local, extracted }
  })
}

export interface FleetResult extends P2pdMemory {
  /** Each node's time to ready, ms. */
  times: number[]
  /** Registry bytes sent for the whole fleet. */
  egress: number
  /** From the first start to the last ready, ms. */
  ms: number
  /** With peers: the fewest strata peers a node had at the start (n - 1: a full mesh). */
  fewestPeers?: number
  /** CPU time (user + sys, ms) of the N p2p-mount processes, summed. */
  mountCpuMs?: number
}

/** The p2p-mounts' CPU summed, when every one was read. */
function mountCpu(times: Timing[]): { mountCpuMs?: number } {
  const cpus = times.map((t) => t.mountCpuMs)
  return cpus.every((c) => c !== undefined) ? { mountCpuMs: Math.round(cpus.reduce((a, b) => a + b, 0)) } : {}
}

/** 3a. N cold nodes start the image at once, no peers: N lazy mounts, each with its own store. */
export async function fleetAlone(lab: Lab, workload: Workload, ref: string, n: number): Promise<FleetResult> {
  const dirs = Array.from({ length: n }, (_, i) => join(lab.work, `${workload.name}-alone-${i}`))
  try {
    let times: Timing[] = []
    const all = await timed(lab, async () => {
      times = await settled(dirs.map((d, i) => lazyStart(lab, ref, workload, d, { host: i })))
    })
    return { times: times.map((t) => t.ms), egress: all.egress, ms: all.ms, ...mountCpu(times) }
  } finally {
    await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })))
  }
}

/** 3b. N cold nodes of one cluster start the image at once: N p2p-mounts, each served by its node's p2pd. */
export async function fleetPeers(lab: Lab, workload: Workload, ref: string, n: number): Promise<FleetResult> {
  const { nodes, fewestPeers } = await startNodes(lab, `${workload.name}-fleet`, n, true)
  return measuring(nodes, async () => {
    let times: Timing[] = []
    const all = await timed(lab, async () => {
      times = await settled(
        nodes.map((node, i) => lazyStart(lab, ref, workload, node.dataDir, { socket: node.socket, host: i }))
      )
    })
    return { times: times.map((t) => t.ms), egress: all.egress, ms: all.ms, fewestPeers, ...mountCpu(times) }
  })
}

/** 4a. `p2pctl warm IMAGE --cluster` on one node of an N-node cluster, until every node holds the image. */
export async function clusterWarm(
  lab: Lab,
  ref: string,
  n: number
): Promise<Timing & { fewestPeers: number } & P2pdMemory> {
  const { nodes, fewestPeers } = await startNodes(lab, 'cluster', n, true)
  return measuring(nodes, async () => {
    const timing = await timed(lab, async (mark) => {
      const r = await p2pctl<ClusterWarmResult>(lab, nodes[0]!, ['warm', ref, '--cluster'])
      const failed = Object.entries(r.nodes).filter(([, v]) => !v.ok)
      if (failed.length > 0 || Object.keys(r.nodes).length < n) {
        // What the failed nodes' p2pd said is what their owners need.
        const said = failed.map(([peer]) => {
          const stderr =
            nodes
              .find((x) => x.peerId === peer)
              ?.daemon.stderr()
              .trim() ?? ''
          return stderr !== '' ? `; p2pd ${peer} said: ${stderr.slice(-1000)}` : ''
        })
        throw new Error(
          `p2pctl warm --cluster: ${Object.keys(r.nodes).length - failed.length} of ${n} nodes hold ${ref}` +
            failed.map(([peer, v]) => `; ${peer}: ${v.error}`).join('') +
            said.join('')
        )
      }
      mark('warm')
    })
    return { ...timing, fewestPeers }
  })
}

/** 4b. The baseline: N lone p2pd (no peers) each running `p2pctl warm IMAGE`, all at once. */
export async function independentWarms(lab: Lab, ref: string, n: number): Promise<Timing & P2pdMemory> {
  const { nodes } = await startNodes(lab, 'lone', n, false)
  return measuring(nodes, () =>
    timed(lab, async (mark) => {
      await settled(nodes.map((node) => warm(lab, node, ref)))
      mark('warm')
    })
  )
}
