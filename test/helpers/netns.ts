import { execFile, execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { promisify } from 'node:util'

const exec = promisify(execFile)

/**
 * A lab of network namespaces (root only): one namespace per node, each with a veth pair whose other end is on
 * a bridge in the root namespace, on a private 10.x.0.0/24. Each veth end has a tc tbf qdisc, so a node's link
 * is capped at `mbit` in each direction (egress on the namespace side, ingress on the bridge side). Only
 * bandwidth is shaped between nodes: netem (delay) does not exist in this kernel. The bridge holds the subnet's
 * first address (`gateway`), where services of the root namespace (the WAN emulator) listen for the nodes.
 *
 * Everything is created by `startNetns` and removed by `stop()` (also at process exit, if `stop()` was not called).
 */
export interface NetnsOptions {
  /** Namespaces to create (one per node). */
  count: number
  /** Per-node link bandwidth, Mbit/s each way. Default 1000. */
  mbit?: number
  log?: (line: string) => void
}

export interface NetnsHost {
  /** The namespace's name (`ip netns list`). */
  name: string
  /** The node's address in the namespace. */
  addr: string
  /** `cmd args` run inside the namespace's network (only the network: mounts are shared with the caller). */
  wrap(cmd: string, args: string[]): [string, string[]]
}

export interface Netns {
  /** The bridge's address in the root namespace, reachable from every namespace. */
  gateway: string
  hosts: NetnsHost[]
  stop(): Promise<void>
}

const ip = (args: string[]) => exec('ip', args)
const tc = (args: string[]) => exec('tc', args)

/** A 10.x.0.0/24 no interface of this machine uses. */
async function freeSubnet(): Promise<number> {
  const { stdout } = await ip(['-o', '-4', 'addr'])
  for (let tries = 0; tries < 50; tries++) {
    const x = 100 + (randomBytes(1)[0]! % 150)
    if (!stdout.includes(` 10.${x}.`)) return x
  }
  throw new Error('netns: found no free 10.x.0.0/24 subnet')
}

/** tbf for `mbit`: the bucket holds at least one GSO packet and a 10 ms tick's worth of bytes. */
const tbf = (mbit: number) => [
  'tbf',
  'rate',
  `${mbit}mbit`,
  'burst',
  String(Math.max(128 * 1024, Math.ceil((mbit * 1_000_000) / 8 / 100))),
  'latency',
  '50ms'
]

export async function startNetns(options: NetnsOptions): Promise<Netns> {
  if (options.count > 250) throw new Error('netns: at most 250 namespaces')
  const mbit = options.mbit ?? 1000
  const id = randomBytes(2).toString('hex')
  const bridge = `stb${id}`
  const names: string[] = []
  const x = await freeSubnet()
  const gateway = `10.${x}.0.1`
  let removed = false
  const removeSync = () => {
    if (removed) return
    removed = true
    for (const n of names) {
      try {
        execFileSync('ip', ['netns', 'del', n], { stdio: 'ignore' })
      } catch {}
    }
    try {
      execFileSync('ip', ['link', 'del', bridge], { stdio: 'ignore' })
    } catch {}
  }
  process.once('exit', removeSync)
  const stop = async () => {
    process.removeListener('exit', removeSync)
    if (removed) return
    removed = true
    // Deleting a namespace deletes its veth end, and with it the bridge's end.
    await Promise.allSettled(names.map((n) => ip(['netns', 'del', n])))
    await ip(['link', 'del', bridge]).catch(() => {})
  }
  try {
    await ip(['link', 'add', bridge, 'type', 'bridge'])
    await ip(['addr', 'add', `${gateway}/24`, 'dev', bridge])
    await ip(['link', 'set', bridge, 'up'])
    const hosts: NetnsHost[] = []
    for (let i = 0; i < options.count; i++) {
      const name = `strata-${id}-${i}`
      const outer = `stb${id}h${i}`
      const inner = `stb${id}n${i}`
      const addr = `10.${x}.0.${i + 2}`
      await ip(['netns', 'add', name])
      names.push(name)
      await ip(['link', 'add', outer, 'type', 'veth', 'peer', 'name', inner])
      await ip(['link', 'set', inner, 'netns', name])
      await ip(['link', 'set', outer, 'master', bridge])
      await ip(['link', 'set', outer, 'up'])
      await ip(['-n', name, 'addr', 'add', `${addr}/24`, 'dev', inner])
      await ip(['-n', name, 'link', 'set', inner, 'up'])
      await ip(['-n', name, 'link', 'set', 'lo', 'up'])
      await ip(['-n', name, 'route', 'add', 'default', 'via', gateway])
      await tc(['qdisc', 'add', 'dev', outer, 'root', ...tbf(mbit)])
      await tc(['-n', name, 'qdisc', 'add', 'dev', inner, 'root', ...tbf(mbit)])
      hosts.push({
        name,
        addr,
        // nsenter (not `ip netns exec`, which unshares the mount namespace: a FUSE mount made there would not be
        // seen outside). Without --fork it execs the command: the pid is the command's.
        wrap: (cmd, args) => ['nsenter', [`--net=/run/netns/${name}`, '--', cmd, ...args]]
      })
    }
    options.log?.(`netns: ${options.count} namespaces on ${bridge} (10.${x}.0.0/24), ${mbit} Mbit/s links`)
    return { gateway, hosts, stop }
  } catch (err) {
    await stop()
    throw err
  }
}
