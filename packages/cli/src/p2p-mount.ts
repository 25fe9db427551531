import { homedir } from 'node:os'
import { join, resolve } from 'node:path'
import { StrataError } from '@strata/base'
import { createControlClient } from '@strata/node/client'
import { parseReference } from '@strata/registry/reference'
import { type Command, type Context, runCommand, UsageError } from './command.js'
import type { MountEvent, MountRequest } from './mount-routes.js'

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
    creds: {
      type: 'string',
      multiple: true,
      value: '[HOST=]USER:PASS',
      description: 'registry credentials, for HOST or the image registry (else ~/.docker/config.json)'
    },
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
  // A mount p2pd serves (or holds for its p2p-mount that died) ends through p2pd, which ends its FUSE session.
  const socket = (ctx.opts.socket as string | undefined) ?? process.env.STRATA_SOCKET ?? DEFAULT_SOCKET
  const byDaemon =
    (await daemonAnswers(socket, ctx.signal)) &&
    (await createControlClient(socket)
      .post<{ unmounted?: boolean }>('/unmount', { mountpoint }, { signal: ctx.signal })
      .then(
        (r) => r.unmounted === true,
        () => false
      ))
  const { forceUnmount, isMounted } = await import('@strata/fs')
  const { writableDirOf } = await import('@strata/mounts')
  const lower = join(writableDirOf(dataDir(ctx), mountpoint), 'lower')
  const removed = (await forceUnmount(mountpoint, { signal: ctx.signal })) || byDaemon
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
  try {
    parseReference(image)
  } catch (err) {
    if ((err as Error).name === 'InvalidReferenceError') throw new UsageError((err as Error).message)
    throw err
  }
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
  // Embedded mode loads the store, fetcher, registry client and FUSE binding; daemon mode (each container
  // start on a node with p2pd) needs none of them and starts about 35 ms sooner without.
  const { mountHere } = await import('./mount-here.js')
  return mountHere(ctx, { image, mountpoint, shown: mountpointArg, dataDir: dataDir(ctx), recordFile })
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
 *
 * When p2pd goes away (it stops, restarts, is upgraded or killed), the mount stays: its FUSE session is held
 * for the next p2pd, and reads wait for it. This process waits too, and asks the next p2pd for the mount
 * again (`resume`); a SIGTERM meanwhile unmounts as soon as a p2pd answers.
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
  const unmount = () => {
    unmounting ??= control.post('/unmount', { mountpoint: request.mountpoint })
    unmounting.catch(() => {})
  }
  const onAbort = () => {
    if (mounted) unmount()
    else stream.abort(signal.reason)
  }
  signal.addEventListener('abort', onAbort, { once: true })
  /** p2pd went away and has not served the mount again yet (said once). */
  let away = false
  const gone = (message: string) => {
    if (!away) out.warn(message)
    away = true
  }
  try {
    for (;;) {
      try {
        await control.stream(
          '/mount',
          mounted ? { ...request, resume: true } : request,
          (event) => {
            const e = event as MountEvent
            if (e.type === 'opened') out.info(`opened ${request.image} through p2pd at ${socket}: ${e.layers} layers`)
            else if (e.type === 'read-error') out.warn(`read of ${e.path} (layer ${e.layer}) failed: ${e.message}`)
            else if (e.type === 'warning') out.warn(e.message)
            else if (e.type === 'resumed') {
              away = false
              out.info(`p2pd at ${socket} serves the mount at ${request.mountpoint} again`)
            } else if (e.type === 'detached') gone(`${e.message}; waiting for p2pd at ${socket} to come back`)
            else if (e.type === 'mounted') {
              mounted = true
              out.print(`mounted ${request.image} at ${shownMountpoint}`)
              if (signal.aborted) onAbort()
            }
          },
          { signal: stream.signal }
        )
        break
      } catch (err) {
        const name = (err as Error).name
        if (!mounted) {
          if (name === 'NotFound') {
            out.warn(`p2pd at ${socket} does not serve mounts: mounting in this process`)
            return undefined
          }
          throw err
        }
        // Asked to stop, and p2pd has unmounted (the stream may end before its result then).
        if (
          signal.aborted &&
          (await unmounting?.then(
            () => true,
            () => false
          ))
        )
          break
        if (name === 'MountGone' || name === 'Forbidden' || name === 'MountBusy') throw err
        if (!signal.aborted) {
          gone(`lost p2pd at ${socket}; the mount at ${request.mountpoint} stays: waiting for p2pd to come back`)
        }
      }
      // p2pd is away (or stopping still). Asked to stop meanwhile: unmount through the next p2pd, if one answers.
      if (signal.aborted) return await unmountLater(ctx, socket, request.mountpoint)
      unmounting = undefined
      await new Promise((r) => setTimeout(r, 250))
      await untilDaemonAnswers(socket, signal)
      if (signal.aborted) return await unmountLater(ctx, socket, request.mountpoint)
    }
  } finally {
    signal.removeEventListener('abort', onAbort)
  }
  await unmounting
  if (!signal.aborted) {
    out.error(`p2pd at ${socket} ended the mount at ${request.mountpoint}`)
    return 1
  }
  out.info(`unmounted ${request.mountpoint}`)
  return 0
}

/** Polls p2pd until it answers, or the signal aborts. */
async function untilDaemonAnswers(socket: string, signal: AbortSignal, deadline = Number.POSITIVE_INFINITY) {
  while (!signal.aborted && Date.now() < deadline && !(await daemonAnswers(socket, signal))) {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 250)
      signal.addEventListener('abort', () => {
        clearTimeout(timer)
        resolve()
      })
    })
  }
}

/** How long a p2p-mount asked to stop while p2pd is away waits for a p2pd to unmount through. */
const UNMOUNT_WAIT_MS = 15_000

/** SIGTERM while p2pd is away: the mount goes when a p2pd answers within a while; else the next p2pd ends it. */
async function unmountLater(ctx: Context, socket: string, mountpoint: string): Promise<number> {
  const deadline = Date.now() + UNMOUNT_WAIT_MS
  const never = new AbortController().signal
  for (;;) {
    await untilDaemonAnswers(socket, never, deadline)
    try {
      await createControlClient(socket).post('/unmount', { mountpoint })
      ctx.out.info(`unmounted ${mountpoint}`)
      return 0
    } catch (err) {
      if (Date.now() >= deadline) {
        throw new DaemonLostError(socket, mountpoint, { cause: err })
      }
      await new Promise((r) => setTimeout(r, 250))
    }
  }
}

/** Asked to stop, p2p-mount could not reach a p2pd to unmount through. */
class DaemonLostError extends StrataError {
  override name = 'DaemonLostError'
  override readonly code = 'ERR_DAEMON_LOST'
  override readonly hint: string
  constructor(socket: string, mountpoint: string, options?: { cause?: unknown }) {
    super(`p2pd at ${socket} does not answer: the mount at ${mountpoint} stays until a p2pd is back`, options)
    this.hint = `the next p2pd unmounts it (this p2p-mount is gone), or run 'p2p-mount --unmount ${mountpoint}'`
  }
}

function dataDir(ctx: Context): string {
  return resolve((ctx.opts['data-dir'] as string | undefined) ?? defaultDataDir())
}
