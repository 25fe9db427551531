import { homedir } from 'node:os'
import { join, resolve } from 'node:path'
import { createFetcher, createRegistrySource, type FetchEvent, openImage, resolveImage } from '@strata/fetcher'
import { forceUnmount, isMounted, type ReadFailure, serveMount } from '@strata/fs'
import { createControlClient } from '@strata/node/client'
import { createRegistryClient, parseReference, type RegistryClient } from '@strata/registry'
import { openDiskStore } from '@strata/store'
import { type Command, type Context, runCommand, UsageError } from './command.js'
import { type MountEvent, type MountRequest, writableDir, writableDirOf } from './mount-routes.js'
import { formatBytes, Progress } from './output.js'

/** The default data directory: p2pd's when root, else a per-user one. */
function defaultDataDir(): string {
  if (process.getuid?.() === 0) return '/var/lib/strata'
  return join(process.env.XDG_DATA_HOME ?? join(homedir(), '.local', 'share'), 'strata')
}

const command: Command = {
  name: 'p2p-mount',
  summary: 'mount a container image lazily: files are fetched chunk by chunk when first read',
  usage: 'IMAGE MOUNTPOINT | --unmount MOUNTPOINT',
  description: `Mounts the merged root file system of IMAGE (read-only; --writable puts an overlayfs on top) and
stays in the foreground until SIGINT or SIGTERM, then unmounts. Prints 'mounted IMAGE at MOUNTPOINT' once
the mount is ready. eStargz layers are read lazily; other layers are fetched whole first.
When a p2pd answers on --socket, it serves the mount (its store, then its peers, then the registry);
otherwise p2p-mount opens the store in --data-dir itself and reads from the registry.

Examples:
  p2p-mount registry.example.com/app:1.2 /mnt/app
  p2p-mount --record /tmp/app.files --writable ghcr.io/org/app:latest /mnt/app
  p2p-mount --unmount /mnt/app       # clean up after a p2p-mount that was killed`,
  args: { min: 1, max: 2 },
  options: {
    socket: {
      type: 'string',
      value: 'PATH',
      description:
        "p2pd's control socket: when p2pd answers there, it serves the mount (default: /run/strata/p2pd.sock)"
    },
    'data-dir': {
      type: 'string',
      value: 'DIR',
      description: `chunk store and writable layers (default: ${defaultDataDir()})`
    },
    platform: { type: 'string', value: 'OS/ARCH', description: 'platform to pick from a multi-platform image' },
    writable: { type: 'boolean', description: 'overlay a writable layer (kept under the data dir)' },
    record: {
      type: 'string',
      value: 'FILE',
      description: 'write the files read, in first-read order, to FILE (for p2pctl convert --prioritized-file)'
    },
    'insecure-registry': {
      type: 'string',
      multiple: true,
      value: 'HOST',
      description: 'talk plain HTTP to this registry host[:port] (loopback registries always are)'
    },
    creds: { type: 'string', value: 'USER:PASS', description: 'registry credentials (else ~/.docker/config.json)' },
    'require-verified': {
      type: 'boolean',
      description: 'refuse eStargz layers whose TOC digest the manifest does not vouch for'
    },
    unmount: { type: 'boolean', description: 'remove the mount at MOUNTPOINT whose p2p-mount died' }
  },
  run: (ctx) => (ctx.opts.unmount === true ? unmount(ctx) : mount(ctx))
}

export function main(argv: string[]): Promise<number> {
  return runCommand(command, argv)
}

async function unmount(ctx: Context): Promise<number> {
  if (ctx.args.length !== 1) throw new UsageError('--unmount takes only MOUNTPOINT')
  const mountpoint = resolve(ctx.args[0]!)
  const lower = join(writableDirOf(dataDir(ctx), mountpoint), 'lower')
  const removed = await forceUnmount(mountpoint, { signal: ctx.signal })
  // A writable mount has its FUSE mount under the data dir, below the overlay.
  const removedLower = (await isMounted(lower)) && (await forceUnmount(lower, { signal: ctx.signal }))
  if (!removed && !removedLower) {
    ctx.out.info(`nothing is mounted at ${mountpoint}`)
    return 0
  }
  ctx.out.print(`unmounted ${mountpoint}`)
  return 0
}

async function mount(ctx: Context): Promise<number> {
  if (ctx.args.length !== 2) throw new UsageError('missing MOUNTPOINT')
  const [image, mountpointArg] = ctx.args as [string, string]
  const mountpoint = resolve(mountpointArg)
  const recordFile = typeof ctx.opts.record === 'string' ? resolve(ctx.opts.record) : undefined
  const client = registryClient(ctx, image)
  const socket = (ctx.opts.socket as string | undefined) ?? process.env.STRATA_SOCKET ?? DEFAULT_SOCKET
  if (await daemonAnswers(socket, ctx.signal)) {
    const request: MountRequest = {
      image,
      mountpoint,
      ...(ctx.opts.writable === true && { writable: true }),
      ...(recordFile !== undefined && { record: recordFile })
    }
    const code = await mountThroughDaemon(ctx, socket, request, mountpointArg)
    if (code !== undefined) return code
  }
  return mountHere(ctx, image, mountpoint, mountpointArg, recordFile, client)
}

const DEFAULT_SOCKET = '/run/strata/p2pd.sock'

function daemonAnswers(socket: string, signal: AbortSignal): Promise<boolean> {
  return createControlClient(socket, { timeoutMs: 2000 })
    .get('/status', { signal })
    .then(
      () => true,
      () => false
    )
}

/**
 * Daemon mode: p2pd serves the mount (its store, its peers) for as long as this process holds the request
 * open. Undefined when this p2pd does not serve mounts: the caller mounts in this process instead.
 */
async function mountThroughDaemon(
  ctx: Context,
  socket: string,
  request: MountRequest,
  shownMountpoint: string
): Promise<number | undefined> {
  const { out, signal } = ctx
  for (const flag of ['platform', 'require-verified', 'insecure-registry', 'creds']) {
    const v = ctx.opts[flag]
    if (v !== undefined && v !== false && !(Array.isArray(v) && v.length === 0)) {
      out.warn(`--${flag} is ignored: p2pd at ${socket} opens the image with its own settings`)
    }
  }
  const control = createControlClient(socket)
  const stream = new AbortController()
  let mounted = false
  let unmounting: Promise<unknown> | undefined
  const onAbort = () => {
    if (mounted) unmounting ??= control.post('/unmount', { mountpoint: request.mountpoint })
    else stream.abort(signal.reason)
  }
  signal.addEventListener('abort', onAbort, { once: true })
  try {
    await control.stream(
      '/mount',
      request,
      (event) => {
        const e = event as MountEvent
        if (e.type === 'opened') out.info(`opened ${request.image} through p2pd at ${socket}: ${e.layers} layers`)
        else if (e.type === 'read-error') out.warn(`read of ${e.path} (layer ${e.layer}) failed: ${e.message}`)
        else if (e.type === 'warning') out.warn(e.message)
        else if (e.type === 'mounted') {
          mounted = true
          out.print(`mounted ${request.image} at ${shownMountpoint}`)
          if (signal.aborted) onAbort()
        }
      },
      { signal: stream.signal }
    )
  } catch (err) {
    if ((err as Error).name === 'NotFound' && !mounted) {
      out.warn(`p2pd at ${socket} does not serve mounts: mounting in this process`)
      return undefined
    }
    if (mounted && !signal.aborted) throw new DaemonLostError(socket, request.mountpoint, { cause: err })
    throw err
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
  await unmounting
  if (!signal.aborted) {
    out.error(`p2pd at ${socket} ended the mount at ${request.mountpoint} (is it stopping?)`)
    return 1
  }
  out.info(`unmounted ${request.mountpoint}`)
  return 0
}

/** Embedded mode: this process owns the store and serves the mount itself. */
async function mountHere(
  ctx: Context,
  image: string,
  mountpoint: string,
  mountpointArg: string,
  recordFile: string | undefined,
  client: RegistryClient
): Promise<number> {
  const dir = dataDir(ctx)
  const { signal, out } = ctx

  // The store opens while the manifest is on its way.
  const platform = ctx.opts.platform as string | undefined
  const pending = client.getImage(image, { platform, signal })
  pending.catch(() => {})
  const store = await openDiskStore(join(dir, 'store'))
  try {
    const stale = (e: FetchEvent) => {
      if (e.type === 'image:stale') out.warn(e.message)
    }
    const pinned = await resolveImage({ client, store, ref: image, platform, pending, signal, onProgress: stale })
    const layerIndex = new Map(pinned.layers.map((l, i) => [l.digest, i]))
    const tocs = new Progress(out.stderr, `opening ${image}`, pinned.layers.length, false)
    const downloading = new Set<string>()
    const onProgress = (e: FetchEvent) => {
      if (e.type === 'layer:toc') tocs.add(1)
      else if (e.type === 'layer:unverified') out.warn(e.message)
      else if (e.type === 'layer:download' && !downloading.has(e.layer)) {
        downloading.add(e.layer)
        out.info(`layer ${layerIndex.get(e.layer)} is not eStargz: fetching it whole (${formatBytes(e.total)})`)
      }
    }
    const opened = await openImage({
      client,
      store,
      ref: pinned.ref,
      image: pinned,
      requireVerified: ctx.opts['require-verified'] === true,
      signal,
      onProgress
    })
    tocs.finish(`opened ${image}: ${opened.layers.length} layers`)

    const fetcher = createFetcher({
      store,
      sources: [createRegistrySource({ client, ref: pinned.ref, layers: opened.layers })]
    })
    let writable: string | undefined
    if (ctx.opts.writable === true) writable = await writableDir(dir, mountpoint, opened.digest)
    const onError = (f: ReadFailure) =>
      out.warn(`read of ${f.path} (layer ${f.layer}, ${f.length} bytes at ${f.offset}) failed: ${f.error.message}`)
    const served = await serveMount(
      {
        image: opened,
        fetcher,
        mountpoint,
        onError,
        ...(writable !== undefined && { writableDir: writable }),
        ...(recordFile !== undefined && { recordFile })
      },
      { signal }
    )
    try {
      out.print(`mounted ${image} at ${mountpointArg}`)
      // The prioritized files of eStargz layers, in the background: the workload will want them first.
      fetcher.prefetch(opened, { signal }).catch((err: Error) => {
        if (!signal.aborted) out.warn(`prefetch of ${image} failed: ${err.message}`)
      })
      await new Promise<void>((done) => {
        if (signal.aborted) done()
        else signal.addEventListener('abort', () => done(), { once: true })
      })
    } finally {
      await served.unmount()
    }
    out.info(`unmounted ${mountpoint}${recordFile !== undefined ? `; recorded reads in ${recordFile}` : ''}`)
    return 0
  } finally {
    await store.close()
  }
}

/** The p2pd serving this mount went away mid-mount (it crashed or was killed). */
class DaemonLostError extends Error {
  override name = 'DaemonLostError'
  readonly code = 'ERR_DAEMON_LOST'
  readonly hint: string
  constructor(socket: string, mountpoint: string, options?: { cause?: unknown }) {
    super(`lost p2pd at ${socket}, which served the mount at ${mountpoint}`, options)
    this.hint = `if ${mountpoint} is left stale, run 'p2p-mount --unmount ${mountpoint}'`
  }
}

function dataDir(ctx: Context): string {
  return resolve((ctx.opts['data-dir'] as string | undefined) ?? defaultDataDir())
}

function registryClient(ctx: Context, image: string): RegistryClient {
  let registry: string
  try {
    registry = parseReference(image).registry
  } catch (err) {
    if ((err as Error).name === 'InvalidReference') throw new UsageError((err as Error).message)
    throw err
  }
  const insecure = (ctx.opts['insecure-registry'] as string[] | undefined) ?? []
  const creds = ctx.opts.creds as string | undefined
  if (creds === undefined) return createRegistryClient({ insecure })
  const colon = creds.indexOf(':')
  if (colon <= 0) throw new UsageError(`--creds must be USER:PASS, not '${creds}'`)
  const credentials = { [registry]: { username: creds.slice(0, colon), password: creds.slice(colon + 1) } }
  return createRegistryClient({ insecure, credentials })
}
