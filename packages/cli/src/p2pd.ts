import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { LayerStore } from '@strata/fs'
import {
  type ControlServer,
  createNode,
  type MetricsServer,
  type MirrorServer,
  type StrataNode,
  startControlServer,
  startMetricsServer,
  startMirrorServer
} from '@strata/node'
import { createRegistryClient } from '@strata/registry'
import { type SnapshotterService, startSnapshotter } from '@strata/snapshotter'
import { type LocalChunkStore, openDiskStore, type StoreErrorEventDetail } from '@strata/store'
import { type Command, type Options, parseBytes, runCommand, UsageError } from './command.js'
import { type Credentials, parseCredentials } from './credentials.js'
import { startLayerStore } from './layer-store.js'
import { addMountRoutes, type MountRoutes } from './mount-routes.js'
import type { Output } from './output.js'

const DEFAULTS = {
  'data-dir': '/var/lib/strata',
  listen: ['/ip4/0.0.0.0/tcp/4001'],
  socket: '/run/strata/p2pd.sock'
}

/** Settings come from flags, then STRATA_* variables, then the config file, then the defaults. */
interface Settings {
  dataDir: string
  listen: string[]
  bootstrap: string[]
  socket: string
  metricsListen?: string
  mirrorListen?: string
  cacheSize?: number
  pskFile?: string
  insecureRegistry: string[]
  /** Registries peers may have this node read from: --registry, --insecure-registry and those of --creds. */
  registries: string[]
  credentials: Record<string, Credentials>
  mdns: boolean
  /** FUSE passthrough for files held whole in the store, where the kernel offers it (--fuse-passthrough off). */
  fusePassthrough: boolean
  /** Serve containerd's snapshots API (a proxy snapshotter plugin) on this Unix socket. */
  snapshotterSocket?: string
  /** Mount containers-storage's additional layer store (podman) here. */
  layerStore?: string
}

const LISTS = new Set(['listen', 'bootstrap', 'insecure-registry', 'registry', 'creds'])
const KEYS = [
  'data-dir',
  'listen',
  'bootstrap',
  'socket',
  'metrics-listen',
  'mirror-listen',
  'cache-size',
  'psk-file',
  'insecure-registry',
  'registry',
  'creds',
  'mdns',
  'fuse-passthrough',
  'snapshotter-socket',
  'layer-store'
] as const

/** `on`/`off` (or a config file's true/false). */
function onOff(value: unknown, key: string): boolean {
  if (value === true || value === 'on' || value === 'true' || value === '1') return true
  if (value === false || value === 'off' || value === 'false' || value === '0') return false
  throw new UsageError(`--${key} must be on or off, not '${String(value)}'`)
}

function envName(key: string): string {
  return `STRATA_${key.toUpperCase().replaceAll('-', '_')}`
}

async function settings(opts: Options, env: NodeJS.ProcessEnv): Promise<Settings> {
  let config: Record<string, unknown> = {}
  const configPath = (opts.config as string | undefined) ?? env.STRATA_CONFIG
  if (configPath !== undefined) {
    try {
      config = JSON.parse(await readFile(configPath, 'utf8')) as Record<string, unknown>
    } catch (err) {
      throw new UsageError(`cannot read the config file ${configPath}: ${(err as Error).message}`)
    }
    const unknown = Object.keys(config).filter((k) => !(KEYS as readonly string[]).includes(k))
    if (unknown.length > 0) throw new UsageError(`unknown keys in ${configPath}: ${unknown.join(', ')}`)
  }
  const pick = (key: (typeof KEYS)[number]): unknown => {
    const flag = opts[key]
    if (flag !== undefined && !(Array.isArray(flag) && flag.length === 0)) return flag
    const fromEnv = env[envName(key)]
    if (fromEnv !== undefined && fromEnv !== '') {
      if (LISTS.has(key))
        return fromEnv
          .split(',')
          .map((s) => s.trim())
          .filter((s) => s !== '')
      if (key === 'mdns') return fromEnv === '1' || fromEnv === 'true'
      return fromEnv
    }
    if (config[key] !== undefined) return config[key]
    return DEFAULTS[key as keyof typeof DEFAULTS]
  }
  const list = (key: (typeof KEYS)[number]): string[] => {
    const v = pick(key)
    if (v === undefined) return []
    const arr = Array.isArray(v) ? v : [v]
    if (!arr.every((x) => typeof x === 'string')) throw new UsageError(`${key} must be a list of strings`)
    return arr
  }
  const text = (key: (typeof KEYS)[number]): string | undefined => {
    const v = pick(key)
    if (v === undefined) return undefined
    if (typeof v !== 'string' && typeof v !== 'number') throw new UsageError(`${key} must be a string`)
    return String(v)
  }
  const cacheSize = text('cache-size')
  const credentials = parseCredentials(list('creds'))
  const insecureRegistry = list('insecure-registry')
  const metricsListen = text('metrics-listen')
  const mirrorListen = text('mirror-listen')
  for (const [flag, value] of [
    ['metrics-listen', metricsListen],
    ['mirror-listen', mirrorListen]
  ]) {
    if (value !== undefined && !/^.+:\d+$/.test(value)) throw new UsageError(`--${flag} '${value}' is not HOST:PORT`)
  }
  return {
    dataDir: text('data-dir')!,
    listen: list('listen'),
    bootstrap: list('bootstrap'),
    socket: text('socket')!,
    metricsListen,
    mirrorListen,
    cacheSize: cacheSize !== undefined ? parseBytes(cacheSize, 'cache size') : undefined,
    pskFile: text('psk-file'),
    insecureRegistry,
    registries: [...new Set([...list('registry'), ...insecureRegistry, ...Object.keys(credentials)])],
    credentials,
    mdns: pick('mdns') === true,
    fusePassthrough: onOff(pick('fuse-passthrough') ?? 'on', 'fuse-passthrough'),
    snapshotterSocket: text('snapshotter-socket'),
    layerStore: text('layer-store')
  }
}

/**
 * Logs the store's failed writes (a full disk, an I/O error) once per cause: a warm-up on a full disk fails
 * thousands of puts, and strata_store_errors_total (and p2pctl status) count them all.
 */
function logStoreErrors(store: LocalChunkStore, out: Output): void {
  const logged = new Set<string>()
  store.addEventListener('error', (e) => {
    const { operation, error } = (e as CustomEvent<StoreErrorEventDetail>).detail
    let inner: unknown = error
    while (inner instanceof Error && inner.cause instanceof Error) inner = inner.cause
    const cause = `${error.name} ${(inner as { code?: unknown })?.code ?? (inner as Error)?.message ?? ''}`
    if (logged.has(cause)) return
    logged.add(cause)
    const hint = (error as { hint?: unknown }).hint
    out.warn(
      `p2pd: the chunk store failed to write (${operation}): ${error.message}` +
        (typeof hint === 'string' ? `; ${hint}` : '') +
        ' (further failures of this kind are counted in strata_store_errors_total, not logged)'
    )
  })
}

export const p2pd: Command = {
  name: 'p2pd',
  summary: 'strata peer-to-peer node: shares image chunks with the cluster and serves local mounts.',
  description: `Settings come from flags, then STRATA_* environment variables (STRATA_DATA_DIR, STRATA_LISTEN,
STRATA_BOOTSTRAP, STRATA_SOCKET, STRATA_METRICS_LISTEN, STRATA_MIRROR_LISTEN, STRATA_CACHE_SIZE, STRATA_PSK_FILE,
STRATA_INSECURE_REGISTRY, STRATA_REGISTRY, STRATA_CREDS, STRATA_SNAPSHOTTER_SOCKET, STRATA_LAYER_STORE;
lists comma-separated), then the --config JSON file
(same keys as the flags, e.g. {"listen": ["/ip4/0.0.0.0/tcp/4001"], "cache-size": "20G"}). Stop with SIGTERM.

Peers may ask this node to read images (a cluster warm-up, a chunk whose home it is) from the registries it
is configured for only (--registry, --insecure-registry, --creds), and from those a local caller opened here.
Credentials go to their own registry only, never to another host (nor on a redirect to one).

Example:
  p2pd --data-dir /var/lib/strata --bootstrap /ip4/10.0.0.10/tcp/4001/p2p/12D3KooW... --cache-size 20G`,
  options: {
    config: { type: 'string', value: 'FILE', description: 'JSON config file' },
    'data-dir': { type: 'string', value: 'DIR', description: 'chunk store and identity (default: /var/lib/strata)' },
    listen: {
      type: 'string',
      multiple: true,
      value: 'MULTIADDR',
      description: 'address for peers (default: /ip4/0.0.0.0/tcp/4001)'
    },
    bootstrap: {
      type: 'string',
      multiple: true,
      value: 'MULTIADDR',
      description: 'a node to join the cluster through'
    },
    socket: { type: 'string', value: 'PATH', description: 'control socket (default: /run/strata/p2pd.sock)' },
    'metrics-listen': { type: 'string', value: 'HOST:PORT', description: 'serve Prometheus metrics on /metrics' },
    'mirror-listen': {
      type: 'string',
      value: 'HOST:PORT',
      description: 'serve the registry pull API as a P2P mirror for containerd, podman and Docker (off)'
    },
    'cache-size': { type: 'string', value: 'BYTES', description: 'chunk store cap, e.g. 20G (default: no cap)' },
    'psk-file': { type: 'string', value: 'PATH', description: 'pre-shared key: only nodes with the same key connect' },
    'insecure-registry': {
      type: 'string',
      multiple: true,
      value: 'HOST[:PORT]',
      description: 'registry spoken to over plain HTTP'
    },
    registry: {
      type: 'string',
      multiple: true,
      value: 'HOST[:PORT]',
      description: 'a registry peers may have this node read from (those of --insecure-registry and --creds are)'
    },
    creds: {
      type: 'string',
      multiple: true,
      value: 'HOST=USER:PASS',
      description: 'credentials for the registry HOST, sent to no other host'
    },
    mdns: { type: 'boolean', description: 'find peers on the local network by mDNS' },
    'fuse-passthrough': {
      type: 'string',
      value: 'on|off',
      description: 'let the kernel read files held whole in the store itself, where it can (default: on)'
    },
    'snapshotter-socket': {
      type: 'string',
      value: 'PATH',
      description: "serve containerd's snapshots API here, as its proxy plugin (off; see p2pctl containerd-config)"
    },
    'layer-store': {
      type: 'string',
      value: 'DIR',
      description: 'mount an additional layer store for podman on DIR (off; see docs/podman.md)'
    }
  },
  async run({ opts, out, signal }) {
    const s = await settings(opts, process.env)
    // A full disk fails the open with StoreFullError, said plainly; one that filled up meanwhile is made room on by
    // evicting unpinned chunks (the store keeps headroom for its index).
    const store: LocalChunkStore = await openDiskStore(join(s.dataDir, 'store'), {
      ...(s.cacheSize !== undefined ? { maxBytes: s.cacheSize } : {})
    })
    logStoreErrors(store, out)
    const registry = createRegistryClient({ insecure: s.insecureRegistry, credentials: s.credentials })
    let node: StrataNode | undefined
    let control: ControlServer | undefined
    let mounts: MountRoutes | undefined
    let metrics: MetricsServer | undefined
    let snapshots: SnapshotterService | undefined
    let mirror: MirrorServer | undefined
    let layerStore: LayerStore | undefined
    try {
      node = await createNode({
        store,
        dataDir: s.dataDir,
        listen: s.listen,
        bootstrap: s.bootstrap,
        mdns: s.mdns,
        // Peers may ask this node to read from the registries it was configured for (see NodeInit.registries).
        registries: s.registries,
        ...(s.pskFile !== undefined ? { pskFile: s.pskFile } : {}),
        registry: createRegistryClient({ insecure: s.insecureRegistry, credentials: s.credentials }),
        log: (message) => out.info(message)
      })
      control = await startControlServer(node, { socket: s.socket })
      // p2p-mount asks the daemon to serve its mount: one process owns the store, and reads use the peers.
      // Mounts held from an earlier p2pd (restarted, upgraded, killed) are served again at once.
      mounts = addMountRoutes(control, node, {
        dataDir: s.dataDir,
        socket: s.socket,
        passthrough: s.fusePassthrough,
        log: (m) => out.info(m)
      })
      if (s.snapshotterSocket !== undefined) {
        // containerd's proxy snapshotter: remote layers open through this node, image configs come from the registry.
        const n = node
        snapshots = await startSnapshotter({
          root: join(s.dataDir, 'snapshotter'),
          socket: s.snapshotterSocket,
          source: {
            openImage: (ref, options) => n.openImage(ref, options),
            fetcher: n.fetcher,
            fetchBlob: (ref, digest, options) => registry.fetchBlob(ref, digest, options)
          },
          passthrough: s.fusePassthrough,
          log: (message) => out.info(message)
        })
      }
      if (s.layerStore !== undefined) {
        // podman's additional layer store: lookups open images through this node, layers read lazily.
        layerStore = await startLayerStore({ dir: s.layerStore, node, registry, log: (m) => out.info(m) })
      }
      if (s.metricsListen !== undefined) metrics = await startMetricsServer(node, { listen: s.metricsListen })
      if (s.mirrorListen !== undefined) mirror = await startMirrorServer(node.mirror, { listen: s.mirrorListen })
      out.print(
        `p2pd ready: peer ${node.peerId} listening on ${node.addrs().join(', ')}, socket ${s.socket}` +
          (snapshots !== undefined ? `, snapshotter ${snapshots.socket}` : '') +
          (layerStore !== undefined ? `, layer store ${layerStore.mountpoint}` : '') +
          (metrics !== undefined ? `, metrics http://${metrics.address}/metrics` : '') +
          (mirror !== undefined ? `, mirror http://${mirror.address}` : '')
      )
      if (!signal.aborted) await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }))
      out.info(`p2pd: ${(signal.reason as Error)?.message ?? 'stopping'}; finishing requests in flight`)
      return 0
    } finally {
      // Before the control server: the mounts stay, held for the next p2pd, and their p2p-mounts wait for it.
      await mounts?.close()
      await control?.close()
      await snapshots?.close()
      await layerStore?.unmount()
      await metrics?.close()
      await mirror?.close()
      await node?.stop()
      await store.close()
    }
  }
}

export function main(argv: string[]): Promise<number> {
  return runCommand(p2pd, argv)
}
