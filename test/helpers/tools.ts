import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

export const repoRoot = fileURLToPath(new URL('../..', import.meta.url))

/** The reference eStargz implementation, built by scripts/setup.sh into .tools/oracle. */
export function oraclePath(): string {
  const p = process.env.STRATA_ORACLE ?? `${repoRoot}.tools/oracle/oracle`
  if (!existsSync(p)) throw new Error(`the eStargz oracle is not built at ${p}: run ./scripts/setup.sh`)
  return p
}

const exec = promisify(execFile)

/** Runs a command; rejects with its stderr when it exits non-zero. */
export async function run(
  cmd: string,
  args: string[],
  options: { cwd?: string; env?: NodeJS.ProcessEnv; encoding?: 'utf8' | 'buffer'; timeout?: number } = {}
): Promise<{ stdout: string; stderr: string }> {
  try {
    const r = await exec(cmd, args, {
      maxBuffer: 1 << 30,
      timeout: options.timeout ?? 300_000,
      ...options,
      encoding: 'utf8'
    })
    return { stdout: r.stdout, stderr: r.stderr }
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; code?: number }
    throw new Error(`${cmd} ${args.join(' ')} failed (${e.code}): ${e.stderr ?? ''}${e.stdout ?? ''}`, { cause: err })
  }
}

/** Runs the oracle and parses its `key: value` output. */
export async function oracle(args: string[]): Promise<Record<string, string>> {
  const { stdout } = await run(oraclePath(), args)
  return Object.fromEntries(
    stdout
      .split('\n')
      .map((l) => /^([\w.\-/]+):\s*(.*)$/.exec(l))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => [m[1]!, m[2]!])
  )
}
