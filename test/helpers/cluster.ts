import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type ControlClient, createControlClient } from '@strata/node'
import { repoRoot, run } from './tools.js'

/** One p2pd process with its own data dir and control socket. */
export interface P2pdProcess {
  peerId: string
  /** Its listen multiaddrs (with /p2p/). */
  addrs: string[]
  dataDir: string
  socket: string
  proc: ChildProcess
  /** Everything it wrote to stderr so far. */
  stderr(): string
  client: ControlClient
  /** Runs `p2pctl ARGS --socket <its socket>`; resolves with the exit code and output. */
  p2pctl(args: string[]): Promise<{ code: number; stdout: string; stderr: string }>
  /** Sends a signal and waits for the exit; resolves with the exit code (null when killed by the signal). */
  stop(signal?: NodeJS.Signals): Promise<number | null>
}

export interface P2pdOptions {
  dataDir: string
  /** Registries (host:port) reached over plain HTTP. */
  insecureRegistry?: string[]
  bootstrap?: string[]
  pskFile?: string
  /** More p2pd flags. */
  args?: string[]
}

export interface Cluster {
  nodes: P2pdProcess[]
  /** Stops every node still running and removes the data dirs. */
  stop(): Promise<void>
}

export interface ClusterOptions {
  insecureRegistry?: string[]
  /** The pre-shared key file of node i (undefined: none). */
  pskFile?: (i: number) => string | undefined
  args?: string[]
}

const bin = (name: string) => join(repoRoot, 'packages', 'cli', 'bin', `${name}.js`)
let built: Promise<unknown> | undefined

/** Builds the CLI (and what it depends on) once per test file: the processes run from dist. */
export function buildCli(): Promise<unknown> {
  built ??= run('pnpm', ['exec', 'turbo', 'run', 'build', '--filter', '@strata/cli...', '--output-logs=errors-only'], {
    cwd: repoRoot
  })
  return built
}

/** Starts one p2pd and waits for its ready line. */
export async function startP2pd(options: P2pdOptions): Promise<P2pdProcess> {
  const socket = join(options.dataDir, 'p2pd.sock')
  const args = [
    bin('p2pd'),
    '--data-dir',
    options.dataDir,
    '--listen',
    '/ip4/127.0.0.1/tcp/0',
    '--socket',
    socket,
    ...(options.insecureRegistry ?? []).flatMap((r) => ['--insecure-registry', r]),
    ...(options.bootstrap ?? []).flatMap((b) => ['--bootstrap', b]),
    ...(options.pskFile !== undefined ? ['--psk-file', options.pskFile] : []),
    ...(options.args ?? [])
  ]
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env } })
  let stdout = ''
  let stderr = ''
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => {
    stderr += d
  })
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)))
  const ready = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`p2pd did not become ready in 20 s: ${stderr}`)), 20_000)
    proc.stdout?.setEncoding('utf8').on('data', (d: string) => {
      stdout += d
      const line = /^p2pd ready: .*$/m.exec(stdout)
      if (line !== null) {
        clearTimeout(timer)
        resolve(line[0])
      }
    })
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`p2pd exited (${code}) before it was ready: ${stderr}`))
    })
  })
  const m = /^p2pd ready: peer (\S+) listening on (.*), socket /.exec(ready)
  if (m === null) throw new Error(`unexpected ready line: ${ready}`)
  return {
    peerId: m[1]!,
    addrs: m[2]!.split(', '),
    dataDir: options.dataDir,
    socket,
    proc,
    stderr: () => stderr,
    client: createControlClient(socket),
    p2pctl: (a) =>
      new Promise((resolve) => {
        const child = spawn(process.execPath, [bin('p2pctl'), ...a, '--socket', socket], { stdio: 'pipe' })
        let out = ''
        let err = ''
        child.stdout.setEncoding('utf8').on('data', (d: string) => {
          out += d
        })
        child.stderr.setEncoding('utf8').on('data', (d: string) => {
          err += d
        })
        child.once('exit', (code) => resolve({ code: code ?? -1, stdout: out, stderr: err }))
      }),
    stop: (signal = 'SIGTERM') => {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited
      proc.kill(signal)
      return exited
    }
  }
}

/** Starts `n` p2pd processes on loopback; nodes 1..n-1 join through node 0. */
export async function startCluster(n: number, options: ClusterOptions = {}): Promise<Cluster> {
  await buildCli()
  const dirs: string[] = []
  const nodes: P2pdProcess[] = []
  const stop = async () => {
    await Promise.all(nodes.map((node) => node.stop()))
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  }
  try {
    const start = async (i: number, bootstrap: string[]) => {
      const dataDir = await mkdtemp(join(tmpdir(), `strata-p2pd${i}-`))
      dirs.push(dataDir)
      const psk = options.pskFile?.(i)
      const node = await startP2pd({
        dataDir,
        bootstrap,
        ...(options.insecureRegistry !== undefined ? { insecureRegistry: options.insecureRegistry } : {}),
        ...(psk !== undefined ? { pskFile: psk } : {}),
        ...(options.args !== undefined ? { args: options.args } : {})
      })
      nodes[i] = node
      return node
    }
    const first = await start(0, [])
    await Promise.all(Array.from({ length: n - 1 }, (_, i) => start(i + 1, first.addrs)))
    return { nodes, stop }
  } catch (err) {
    await stop()
    throw err
  }
}

/** Waits until every node sees at least `peers` strata peers (the cluster has formed). */
export async function waitForMesh(nodes: P2pdProcess[], peers: number, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const counts = await Promise.all(
      nodes.map(async (n) => (await n.client.get<Array<{ strata: boolean }>>('/peers')).filter((p) => p.strata).length)
    )
    if (counts.every((c) => c >= peers)) return
    if (Date.now() > deadline) throw new Error(`cluster did not form: strata peers per node ${counts.join(', ')}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** The TCP port of a node's first listen address. */
function listenPort(node: P2pdProcess): number {
  const m = /\/tcp\/(\d+)/.exec(node.addrs[0] ?? '')
  if (m === null) throw new Error(`no TCP listen address in ${node.addrs.join(', ')}`)
  return Number(m[1])
}

/**
 * Resets every TCP connection to or from the nodes' listen ports (`ss -K`, as root): a network blip, as when a
 * peer aborts a connection. Every request in flight on those connections fails at once; the nodes dial again.
 * Resolves with the number of sockets it closed.
 */
export async function resetConnections(nodes: P2pdProcess[]): Promise<number> {
  const ports = nodes.map(listenPort)
  const filter = ports.flatMap((p) => [`dport = :${p}`, `sport = :${p}`]).join(' or ')
  const { stdout } = await run('ss', ['-K', '-t', '-n', 'dst', '127.0.0.1', `( ${filter} )`])
  return stdout.split('\n').filter((l) => /^ESTAB/.test(l.trim())).length
}

/**
 * Stops the node's process for `ms` (SIGSTOP, then SIGCONT): its event loop stands still, as on a host too loaded
 * to run it. Its peers see a node that answers nothing, its connections stay up.
 */
export async function pauseP2pd(node: P2pdProcess, ms: number): Promise<void> {
  node.proc.kill('SIGSTOP')
  try {
    await new Promise((resolve) => setTimeout(resolve, ms))
  } finally {
    node.proc.kill('SIGCONT')
  }
}
