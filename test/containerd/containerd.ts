// A real containerd (Debian's 1.6, with runc) for one test file: its own root, state, sockets and config, strata
// as a proxy snapshotter, stopped by pid. Nothing of it touches the machine's /var/lib/containerd.
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createConnection } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { run } from '@test/tools.js'

export interface ContainerdOptions {
  /** Proxy snapshotters: name -> socket. */
  snapshotters: Record<string, string>
  /** Turn CRI on, with this snapshotter and sandbox (pause) image. */
  cri?: { snapshotter: string; sandboxImage: string }
  /** Registries (host:port) reached over plain HTTP by CRI. */
  plainHttp?: string[]
}

export interface Containerd {
  dir: string
  socket: string
  /** CRI's root, where pod logs may go. */
  proc: ChildProcess
  log(): string
  /** `ctr -a SOCKET ARGS` in namespace `ns` (default `strata-test`). */
  ctr(args: string[], options?: { ns?: string; timeout?: number }): Promise<{ stdout: string; stderr: string }>
  stop(): Promise<void>
}

export async function startContainerd(options: ContainerdOptions): Promise<Containerd> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-containerd-'))
  const socket = join(dir, 'containerd.sock')
  const certs = join(dir, 'certs.d')
  for (const host of options.plainHttp ?? []) {
    await mkdir(join(certs, host), { recursive: true })
    await writeFile(
      join(certs, host, 'hosts.toml'),
      `server = "http://${host}"\n[host."http://${host}"]\n  capabilities = ["pull", "resolve"]\n`
    )
  }
  const proxies = Object.entries(options.snapshotters)
    .map(([name, sock]) => `  [proxy_plugins.${name}]\n    type = "snapshot"\n    address = "${sock}"\n`)
    .join('')
  const cri = options.cri
  const config = `version = 2
root = "${join(dir, 'root')}"
state = "${join(dir, 'state')}"
disabled_plugins = [${[
    ...(cri === undefined ? ['io.containerd.grpc.v1.cri'] : []),
    'io.containerd.snapshotter.v1.aufs',
    'io.containerd.snapshotter.v1.btrfs',
    'io.containerd.snapshotter.v1.zfs',
    'io.containerd.snapshotter.v1.devmapper'
  ]
    .map((p) => `"${p}"`)
    .join(', ')}]
[grpc]
  address = "${socket}"
[ttrpc]
  address = "${socket}.ttrpc"
[debug]
  address = "${join(dir, 'debug.sock')}"
  level = "info"
[proxy_plugins]
${proxies}
# The garbage collector removes the snapshots of removed containers and images: run it right after every
# deletion, as tests wait for that (by default it runs at most as often as keeps its pauses under 2% of the
# time, which on a loaded machine can be longer than a test waits).
[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.5
  deletion_threshold = 1
  schedule_delay = "0s"
  startup_delay = "0s"
${
  cri !== undefined
    ? `[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${cri.sandboxImage}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "${cri.snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "${certs}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${join(dir, 'cni', 'bin')}"
    conf_dir = "${join(dir, 'cni', 'conf')}"
`
    : ''
}`
  await writeFile(join(dir, 'config.toml'), config)
  const proc = spawn('containerd', ['--config', join(dir, 'config.toml')], { stdio: ['ignore', 'ignore', 'pipe'] })
  let log = ''
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => {
    log += d
  })
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
  const ctr: Containerd['ctr'] = (args, o = {}) =>
    run('ctr', ['-a', socket, '-n', o.ns ?? 'strata-test', ...args], { timeout: o.timeout ?? 120_000 })
  const deadline = Date.now() + 30_000
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`containerd exited (${proc.exitCode}): ${log}`)
    try {
      await run('ctr', ['-a', socket, 'version'], { timeout: 5_000 })
      break
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`containerd did not answer: ${(err as Error).message}\n${log}`)
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  return {
    dir,
    socket,
    proc,
    log: () => log,
    ctr,
    async stop() {
      // containerd leaves containers running when it stops: what a failed test left goes first.
      if (proc.exitCode === null && proc.signalCode === null) await killTasks(socket)
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM')
        const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000)
        await exited
        clearTimeout(timer)
      }
      // Whatever its containers left mounted under its root (rootfs overlays of tasks not cleaned up).
      await unmountUnder(dir)
      await rm(dir, { recursive: true, force: true }).catch(() => {})
    }
  }
}

/** Kills and deletes every task (running container, CRI sandbox) of the containerd at `socket`. */
async function killTasks(socket: string): Promise<void> {
  const ctr = (args: string[]) => run('ctr', ['-a', socket, ...args], { timeout: 30_000 })
  const lines = (s: string) => s.split('\n').filter((l) => l.trim() !== '')
  const namespaces = lines((await ctr(['namespaces', 'ls', '-q']).catch(() => ({ stdout: '' }))).stdout)
  for (const ns of namespaces) {
    const ids = lines((await ctr(['-n', ns, 'tasks', 'ls', '-q']).catch(() => ({ stdout: '' }))).stdout)
    for (const id of ids) {
      await ctr(['-n', ns, 'tasks', 'kill', '--all', '--signal', 'SIGKILL', id]).catch(() => {})
      await ctr(['-n', ns, 'tasks', 'delete', '--force', id]).catch(() => {})
    }
  }
}

/**
 * Ends what p2pd left with its snapshotter's FUSE session holder when it stopped (it keeps the merged roots for
 * the next p2pd): each session is closed through the holder, which then exits by itself; then whatever is still
 * mounted under `dataDir` is unmounted.
 */
export async function releaseP2pdMounts(dataDir: string): Promise<void> {
  const socket = join(dataDir, 'snapshotter', 'fuse', 'holder.sock')
  const call = (request: object) =>
    new Promise<{ ok?: boolean; sessions?: Array<{ id: string }> }>((resolve, reject) => {
      const c = createConnection(socket)
      let line = ''
      c.setEncoding('utf8')
      c.on('error', reject)
      c.on('connect', () => c.write(`${JSON.stringify(request)}\n`))
      c.on('data', (d: string) => {
        line += d
        if (line.includes('\n')) {
          c.destroy()
          resolve(JSON.parse(line.slice(0, line.indexOf('\n'))))
        }
      })
    })
  const listed = await call({ op: 'list' }).catch(() => undefined)
  for (const s of listed?.sessions ?? []) await call({ op: 'close', id: s.id }).catch(() => {})
  await unmountUnder(dataDir)
}

/** Lazily unmounts every mount at or under `dir`, deepest first. */
export async function unmountUnder(dir: string): Promise<void> {
  const { stdout } = await run('cat', ['/proc/self/mountinfo'])
  const points = stdout
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .map((p) => p.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8))))
    .filter((p) => p === dir || p.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length)
  for (const p of points) await run('umount', ['-l', p]).catch(() => {})
}

/** Mount points (from /proc/self/mountinfo) of type `fuse.strata` under `dir`. */
export async function strataMountsUnder(dir: string): Promise<string[]> {
  const { stdout } = await run('cat', ['/proc/self/mountinfo'])
  return stdout
    .split('\n')
    .filter((l) => / - fuse\.strata /.test(l))
    .map((l) => l.split(' ')[4] ?? '')
    .filter((p) => p.startsWith(`${dir}/`))
}

/** Retries `check` until it passes, at most `ms` (containerd's garbage collector removes snapshots when it runs). */
export async function eventually(check: () => Promise<void>, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms
  for (;;) {
    try {
      return await check()
    } catch (err) {
      if (Date.now() > deadline) throw err
      await new Promise((r) => setTimeout(r, 200))
    }
  }
}
