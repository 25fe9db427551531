import type {
  ClusterWarmProgress,
  ClusterWarmResult,
  ImageRecord,
  NodeStatus,
  PeerStatus,
  WarmProgress,
  WarmResult
} from '@strata/node'
import { type ControlClient, createControlClient } from '@strata/node/client'
import type { Command, Context } from '../command.js'
import { formatBytes } from '../output.js'

function client(ctx: Context): ControlClient {
  const socket = (ctx.opts.socket as string | undefined) ?? process.env.STRATA_SOCKET ?? '/run/strata/p2pd.sock'
  return createControlClient(socket)
}

const json = { type: 'boolean', description: 'print JSON' } as const

const status: Command = {
  name: 'status',
  summary: 'the local p2pd: peer id, addresses, peers, bytes served and fetched, store, announcements',
  options: { json },
  async run(ctx) {
    const s = await client(ctx).get<NodeStatus>('/status', { signal: ctx.signal })
    if (ctx.out.json) {
      ctx.out.printJson(s)
      return 0
    }
    ctx.out.fields({
      peerId: s.peerId,
      addrs: s.addrs.join(' '),
      peers: s.peers,
      served: formatBytes(s.bytes.served),
      fetched: bySource(s.bytes.fetched),
      'fetched-for-peers': bySource(s.bytes.fetchedForPeers),
      store: `${s.store.chunks} chunks, ${formatBytes(s.store.bytes)}${Number.isFinite(s.store.maxBytes) ? ` of ${formatBytes(s.store.maxBytes)}` : ''}`,
      announce: `${s.announce.landed} keys announced, ${s.announce.backlog} waiting`,
      fuse: await fuseLine(ctx),
      // Writes the store could not make (a full disk): p2pd logs the first of each cause.
      'store-errors': s.store.writeErrors ?? 0
    })
    return 0
  }
}

/**
 * How p2pd's mounts read files held whole in the store: what each mount negotiated with the kernel
 * (`passthrough on 2 of 3 mounts, 5 backing files`), or, with none, what this machine would give a mount.
 */
async function fuseLine(ctx: Context): Promise<string> {
  const mounts = await client(ctx)
    .get<Array<{ fuse: { mode: string; backingFiles: number } }>>('/mounts', { signal: ctx.signal })
    .catch(() => [])
  const machine = (await import('@strata/fs')).fuseReadMode()
  if (mounts.length === 0) return `no mounts; ${machine}`
  const through = mounts.filter((m) => m.fuse.mode === 'passthrough').length
  const files = mounts.reduce((n, m) => n + m.fuse.backingFiles, 0)
  return `passthrough on ${through} of ${mounts.length} mounts, ${files} backing files; ${machine}`
}

/** `peer 1.2 MiB, registry 0 B`: bytes per source, or `none`. */
function bySource(bytes: Record<string, number> | undefined): string {
  const entries = Object.entries(bytes ?? {})
  return entries.length === 0 ? 'none' : entries.map(([source, n]) => `${source} ${formatBytes(n)}`).join(', ')
}

const peers: Command = {
  name: 'peers',
  summary: 'connected peers, with measured latency and penalties',
  options: { json },
  async run(ctx) {
    const list = await client(ctx).get<PeerStatus[]>('/peers', { signal: ctx.signal })
    if (ctx.out.json) {
      ctx.out.printJson(list)
      return 0
    }
    if (list.length === 0) ctx.out.info('no peers connected')
    for (const p of list) {
      const banned = (p.bannedUntil ?? 0) > Date.now() ? ' BANNED' : ''
      const latency = p.latencyMs !== undefined ? ` ${Math.round(p.latencyMs)}ms` : ''
      ctx.out.print(`${p.peer} ${p.strata ? 'strata' : 'dht'}${latency}${banned} ${p.addrs.join(' ')}`)
    }
    return 0
  }
}

const images: Command = {
  name: 'images',
  summary: 'images this node has warmed',
  options: { json },
  async run(ctx) {
    const list = await client(ctx).get<ImageRecord[]>('/images', { signal: ctx.signal })
    if (ctx.out.json) {
      ctx.out.printJson(list)
      return 0
    }
    for (const i of list) {
      ctx.out.print(`${i.ref} ${i.digest} ${i.layers.length} layers ${i.chunks} chunks ${formatBytes(i.bytes)}`)
    }
    return 0
  }
}

const warm: Command = {
  name: 'warm',
  summary: 'fetch every chunk of an image into this node (or, with --cluster, into every node)',
  usage: 'IMAGE',
  description: `With --cluster every reachable node fetches its share of the chunks (from the registry or a peer),
then the rest from the others: the registry serves each chunk about once.

Exits 1 when the image did not stay: a node failed, or a store could not keep every chunk (a full disk, a
--cache-size smaller than the image). A warning says how much stayed; with --json, "complete" is false.`,
  args: { min: 1, max: 1 },
  options: { cluster: { type: 'boolean', description: 'warm every node of the cluster' }, json },
  async run(ctx) {
    const image = ctx.args[0]!
    const cluster = ctx.opts.cluster === true
    const bar = ctx.out.json ? undefined : ctx.out.progress(cluster ? `warm ${image} (cluster)` : `warm ${image}`)
    const onEvent = (event: unknown) => {
      const e = event as { type: string } & Partial<WarmProgress> & Partial<ClusterWarmProgress>
      if (e.type !== 'progress' || bar === undefined) return
      if (e.nodes !== undefined) {
        const nodes = Object.values(e.nodes)
        bar.setTotal(nodes.reduce((n, p) => n + p.totalBytes, 0))
        bar.update(nodes.reduce((n, p) => n + p.bytes, 0))
      } else if (e.totalBytes !== undefined) {
        bar.setTotal(e.totalBytes)
        bar.update(e.bytes ?? 0)
      }
    }
    const result = await client(ctx).stream<WarmResult | ClusterWarmResult>('/warm', { image, cluster }, onEvent, {
      signal: ctx.signal
    })
    if ('nodes' in result) {
      // A node holds the image when its warm-up succeeded and its store kept every chunk.
      const failed = Object.entries(result.nodes).filter(([, r]) => !r.ok || r.result?.complete === false)
      if (ctx.out.json) {
        ctx.out.printJson(result)
        return failed.length > 0 ? 1 : 0
      }
      bar?.finish(
        `warm ${image}: ${Object.keys(result.nodes).length - failed.length} of ${Object.keys(result.nodes).length} nodes hold the image`
      )
      for (const [peer, r] of Object.entries(result.nodes)) {
        if (!r.ok) ctx.out.warn(`${peer}: ${r.error}`)
        else if (r.result?.complete === false) ctx.out.warn(`${peer}: ${notKept(r.result)} stayed in its store`)
        if (r.ok && r.result?.stale !== undefined) ctx.out.warn(`${peer}: ${r.result.stale}`)
      }
      return failed.length > 0 ? 1 : 0
    }
    // The image did not stay (a full disk, a cap smaller than it): say so, and why as far as the store tells.
    const why = result.complete === false ? await whyNotKept(ctx, result) : undefined
    if (ctx.out.json) {
      ctx.out.printJson(result)
      if (why !== undefined) ctx.out.warn(why)
      return result.complete === false ? 1 : 0
    }
    bar?.finish(
      `warm ${image}: ${result.totalChunks} chunks, ${formatBytes(result.totalBytes)} in ${(result.ms / 1000).toFixed(1)}s`
    )
    if (result.stale !== undefined) ctx.out.warn(result.stale)
    if (why !== undefined) {
      ctx.out.warn(why)
      return 1
    }
    return 0
  }
}

/** `only 1700 of 4425 chunks (94.1 MiB of 246.7 MiB)` of a warm-up whose store did not keep them all. */
function notKept(r: WarmResult): string {
  return `only ${r.held.chunks} of ${r.totalChunks} chunks (${formatBytes(r.held.bytes)} of ${formatBytes(r.totalBytes)})`
}

/** What to tell of a local warm-up whose store did not keep the whole image: how much stayed, and why. */
async function whyNotKept(ctx: Context, r: WarmResult): Promise<string> {
  const kept = `${notKept(r)} stayed in p2pd's store`
  const s = await client(ctx)
    .get<NodeStatus>('/status', { signal: ctx.signal })
    .then((status) => status.store)
    .catch(() => undefined)
  if (s === undefined) return kept
  if (Number.isFinite(s.maxBytes) && s.maxBytes < r.totalBytes)
    return `${kept}: its cap (--cache-size) is ${formatBytes(s.maxBytes)}, smaller than the image`
  if ((s.writeErrors ?? 0) > 0)
    return `${kept}: ${s.writeErrors} writes to it failed (is its disk full? p2pd's log says why)`
  return `${kept}: the rest was evicted to stay under its cap of ${formatBytes(s.maxBytes)}`
}

const gc: Command = {
  name: 'gc',
  summary: "shrink p2pd's chunk store to its size cap (least recently used, unpinned chunks first)",
  options: { json },
  async run(ctx) {
    const r = await client(ctx).post<{ evicted: number; freedBytes: number; orphansRemoved: number }>(
      '/gc',
      undefined,
      {
        signal: ctx.signal
      }
    )
    if (ctx.out.json) ctx.out.printJson(r)
    else ctx.out.fields({ evicted: r.evicted, freed: formatBytes(r.freedBytes), orphansRemoved: r.orphansRemoved })
    return 0
  }
}

/** `p2pctl status|peers|images|warm|gc`: talk to p2pd over its control socket. */
export const daemonCommands: Command[] = [status, peers, images, warm, gc]
