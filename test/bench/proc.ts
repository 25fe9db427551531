import { type ChildProcess, spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'

/** A command the suite ran failed (or timed out): names it and quotes what it said. */
export class CommandFailedError extends Error {
  override name = 'CommandFailedError'
  readonly code = 'ERR_BENCH_COMMAND_FAILED'
  constructor(command: string, how: string, output: string, options?: { cause?: unknown }) {
    super(`${command} ${how}${output.trim() !== '' ? `: ${output.trim().slice(-2000)}` : ''}`, options)
  }
}

const describe = (cmd: string, args: string[]) => [cmd, ...args].join(' ')

export interface RunOptions {
  signal?: AbortSignal
  /** Default 10 minutes. */
  timeout?: number
  stdin?: string
  env?: NodeJS.ProcessEnv
}

/** Runs a command to its end; rejects when it fails, times out or is aborted. */
export function run(
  cmd: string,
  args: string[],
  options: RunOptions = {}
): Promise<{ stdout: string; stderr: string }> {
  const timeout = options.timeout ?? 600_000
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      stdio: [options.stdin !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'],
      ...(options.env !== undefined ? { env: options.env } : {})
    })
    let stdout = ''
    let stderr = ''
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      stdout += d
    })
    child.stderr?.setEncoding('utf8').on('data', (d: string) => {
      stderr += d
    })
    child.stdin?.end(options.stdin)
    let why: string | undefined
    const kill = (reason: string) => {
      why = reason
      child.kill('SIGKILL')
    }
    const timer = setTimeout(() => kill(`timed out after ${timeout / 1000} s`), timeout)
    const onAbort = () => kill('was aborted')
    options.signal?.addEventListener('abort', onAbort, { once: true })
    if (options.signal?.aborted) onAbort()
    child.once('error', (err) => {
      clearTimeout(timer)
      reject(new CommandFailedError(describe(cmd, args), 'could not start', err.message, { cause: err }))
    })
    child.once('close', (code, sig) => {
      clearTimeout(timer)
      options.signal?.removeEventListener('abort', onAbort)
      if (code === 0) resolve({ stdout, stderr })
      else reject(new CommandFailedError(describe(cmd, args), why ?? `exited with ${code ?? sig}`, stderr + stdout))
    })
  })
}

/** Turns a command into one run elsewhere (e.g. inside a network namespace); its pid must be the command's. */
export type Wrap = (cmd: string, args: string[]) => [string, string[]]

/** A long-running process (p2p-mount, p2pd) that printed its ready line. */
export interface Daemon {
  proc: ChildProcess
  /** The ready line. */
  line: string
  stderr(): string
  /** SIGTERM (then SIGKILL after 30 s); resolves with the exit code, null when killed. */
  stop(): Promise<number | null>
  /**
   * CPU time (user + sys, ms, with its waited-for children) the process used, as last read from /proc/PID/stat:
   * `stop()` reads it before the signal and then every 20 ms until the process is gone, so after `stop()` it is
   * the total but for at most the last 20 ms. Undefined where /proc did not say.
   */
  cpuMs(): number | undefined
}

/** Clock ticks per second of /proc/PID/stat (USER_HZ: 100 on Linux). */
const CLK_TCK = 100

/** utime + stime + cutime + cstime of `pid` in ms; undefined once it was reaped. */
async function readCpuMs(pid: number | undefined): Promise<number | undefined> {
  if (pid === undefined) return undefined
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  if (stat === undefined) return undefined
  // Fields after the command (which may hold spaces) in parentheses: state is field 3, utime field 14.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  const ticks = [11, 12, 13, 14].reduce((sum, i) => sum + Number(f[i]), 0)
  return Number.isFinite(ticks) ? (ticks * 1000) / CLK_TCK : undefined
}

/** Starts a process and waits (default 60 s) for a line of its standard output that matches `ready`. */
export async function startDaemon(
  cmd: string,
  args: string[],
  ready: RegExp,
  options: { signal?: AbortSignal; timeout?: number; wrap?: Wrap } = {}
): Promise<Daemon> {
  const timeout = options.timeout ?? 60_000
  const [c, a] = options.wrap !== undefined ? options.wrap(cmd, args) : [cmd, args]
  const proc = spawn(c, a, { stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  proc.stderr.setEncoding('utf8').on('data', (d: string) => {
    stderr += d
  })
  let gone = false
  const exited = new Promise<number | null>((resolve) =>
    proc.once('close', (code) => {
      gone = true
      resolve(code)
    })
  )
  let cpu: number | undefined
  const sample = async () => {
    const ms = await readCpuMs(proc.pid)
    if (ms !== undefined && (cpu === undefined || ms > cpu)) cpu = ms
  }
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      await sample()
      proc.kill('SIGTERM')
      const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000)
      while (!gone && proc.exitCode === null && proc.signalCode === null) {
        await new Promise((r) => setTimeout(r, 20))
        await sample()
      }
      await exited
      clearTimeout(timer)
    }
    return exited
  }
  try {
    const line = await new Promise<string>((resolve, reject) => {
      const fail = (how: string) => reject(new CommandFailedError(describe(cmd, args), how, stderr))
      const timer = setTimeout(() => fail(`printed no ready line in ${timeout / 1000} s`), timeout)
      options.signal?.addEventListener('abort', () => fail('was aborted'), { once: true })
      proc.stdout.setEncoding('utf8').on('data', (d: string) => {
        stdout += d
        const m = stdout.split('\n').find((l) => ready.test(l))
        if (m !== undefined) {
          clearTimeout(timer)
          resolve(m)
        }
      })
      void exited.then((code) => {
        clearTimeout(timer)
        fail(`exited (${code}) before it was ready`)
      })
    })
    return { proc, line, stderr: () => stderr, stop, cpuMs: () => cpu }
  } catch (err) {
    await stop()
    throw err
  }
}
