import { parseArgs } from 'node:util'
import { StrataError } from '@strata/base'
import { Output } from './output.js'

/** One option of a command, as `node:util` parseArgs takes it, plus what `--help` shows. */
export interface OptionSpec {
  type: 'string' | 'boolean'
  short?: string
  multiple?: boolean
  default?: string | boolean | string[]
  /** Shown in `--help`, e.g. `--chunk-size N`. */
  value?: string
  description: string
}

export type Options = Record<string, string | boolean | string[] | undefined>

export interface Context {
  /** The positional arguments after the command's name. */
  args: string[]
  opts: Options
  out: Output
  /** Aborted on SIGINT/SIGTERM. */
  signal: AbortSignal
}

export interface Command {
  name: string
  summary: string
  /** The argument part of the usage line, e.g. `IN.tar[.gz] OUT`. */
  usage?: string
  /** Longer text shown by `--help`: what it does, examples. */
  description?: string
  options?: Record<string, OptionSpec>
  /** Fewest and most positional arguments (default: none). */
  args?: { min: number; max: number }
  subcommands?: Command[]
  /** Returns the exit code (default 0). */
  run?: (ctx: Context) => Promise<number | undefined> | number | undefined
}

/** Wrong words on the command line: exit code 2, with the usage line. */
export class UsageError extends StrataError {
  override name = 'UsageError'
  override readonly code = 'ERR_USAGE'
}

const HELP: OptionSpec = { type: 'boolean', short: 'h', description: 'show this help' }

/** Parses argv against a command tree and runs the command. Exit codes: 0 ok, 1 failure, 2 usage. */
export async function runCommand(root: Command, argv: string[], out = new Output()): Promise<number> {
  const path: Command[] = [root]
  // Root options may stand before the command's name (`p2pctl --socket S status`): set them aside.
  const leading: string[] = []
  let rest = argv
  for (;;) {
    const cmd = path[path.length - 1]!
    const next = rest[0]
    if (cmd.subcommands === undefined || next === undefined) break
    const rootOption = next.startsWith('--') ? root.options?.[next.slice(2).split('=')[0]!] : undefined
    if (rootOption !== undefined) {
      const takesValue = rootOption.type === 'string' && !next.includes('=')
      leading.push(...rest.slice(0, takesValue ? 2 : 1))
      rest = rest.slice(takesValue ? 2 : 1)
      continue
    }
    if (next.startsWith('-')) break
    const sub = cmd.subcommands.find((s) => s.name === next)
    if (sub === undefined) {
      if (cmd.run !== undefined) break
      return usageFailure(out, path, `unknown command '${next}'`)
    }
    path.push(sub)
    rest = rest.slice(1)
  }
  rest = [...leading, ...rest]
  const cmd = path[path.length - 1]!
  const controller = new AbortController()
  const onSignal = (sig: NodeJS.Signals) => controller.abort(new Error(`interrupted by ${sig}`))
  process.once('SIGINT', onSignal)
  process.once('SIGTERM', onSignal)
  try {
    const options = { ...globalOptions(path), ...cmd.options, help: HELP }
    let parsed: ReturnType<typeof parseArgs>
    try {
      parsed = parseArgs({ args: rest, options: stripDocs(options), allowPositionals: true, strict: true })
    } catch (err) {
      return usageFailure(out, path, (err as Error).message)
    }
    if (parsed.values.help === true || cmd.run === undefined) {
      out.print(helpText(path))
      return cmd.run === undefined && parsed.values.help !== true ? 2 : 0
    }
    const args = parsed.positionals
    const { min, max } = cmd.args ?? { min: 0, max: 0 }
    if (args.length < min) return usageFailure(out, path, 'missing arguments')
    if (args.length > max) return usageFailure(out, path, `unexpected argument '${args[max]}'`)
    out.json = parsed.values.json === true
    const code = await cmd.run({ args, opts: parsed.values as Options, out, signal: controller.signal })
    return code ?? 0
  } catch (err) {
    if ((err as Error)?.name === 'UsageError') return usageFailure(out, path, (err as Error).message)
    out.failure(err)
    return 1
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}

/** Options declared on the root (like `--socket`) are accepted by every command below it. */
function globalOptions(path: Command[]): Record<string, OptionSpec> {
  return path.length > 1 ? { ...path[0]!.options } : {}
}

function stripDocs(options: Record<string, OptionSpec>) {
  return Object.fromEntries(
    Object.entries(options).map(([name, o]) => {
      const spec: {
        type: 'string' | 'boolean'
        short?: string
        multiple?: boolean
        default?: string | boolean | string[]
      } = {
        type: o.type
      }
      if (o.short !== undefined) spec.short = o.short
      if (o.multiple !== undefined) spec.multiple = o.multiple
      if (o.default !== undefined) spec.default = o.default
      return [name, spec]
    })
  )
}

function usageLine(path: Command[]): string {
  const cmd = path[path.length - 1]!
  const names = path.map((c) => c.name).join(' ')
  if (cmd.run === undefined) return `${names} COMMAND [options]`
  return `${names}${cmd.options !== undefined ? ' [options]' : ''}${cmd.usage !== undefined ? ` ${cmd.usage}` : ''}`
}

export function helpText(path: Command[]): string {
  const cmd = path[path.length - 1]!
  const lines = [`Usage: ${usageLine(path)}`, '', cmd.summary]
  if (cmd.description !== undefined) lines.push('', cmd.description.trimEnd())
  if (cmd.subcommands !== undefined && cmd.subcommands.length > 0) {
    lines.push('', 'Commands:')
    const w = Math.max(...cmd.subcommands.map((s) => s.name.length))
    for (const s of cmd.subcommands) lines.push(`  ${s.name.padEnd(w)}  ${s.summary}`)
    lines.push('', `Run '${path.map((c) => c.name).join(' ')} COMMAND --help' for a command's options.`)
  }
  const options = { ...globalOptions(path), ...cmd.options, help: HELP }
  const rows = Object.entries(options).map(([name, o]) => {
    const flag = `${o.short !== undefined ? `-${o.short}, ` : '    '}--${name}${o.type === 'string' ? ` ${o.value ?? 'VALUE'}` : ''}`
    const extra =
      o.multiple === true
        ? ' (repeatable)'
        : o.default !== undefined && o.default !== false
          ? ` (default: ${o.default})`
          : ''
    return [flag, o.description + extra] as const
  })
  const w = Math.max(...rows.map(([f]) => f.length))
  lines.push('', 'Options:', ...rows.map(([f, d]) => `  ${f.padEnd(w)}  ${d}`))
  return lines.join('\n') + '\n'
}

function usageFailure(out: Output, path: Command[], message: string): number {
  out.error(`${path.map((c) => c.name).join(' ')}: ${message}`)
  out.error(`Usage: ${usageLine(path)}`)
  out.error(`Try '${path.map((c) => c.name).join(' ')} --help'.`)
  return 2
}

/** Parses a byte count such as `4194304`, `4MiB`, `512k`, `10GB`. */
export function parseBytes(text: string, what = 'size'): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$/i.exec(text.trim())
  if (m === null) throw new UsageError(`${what} '${text}' is not a byte count (examples: 4194304, 4MiB, 10G)`)
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[
    m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'
  ]
  const n = Math.round(Number(m[1]) * mult)
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`${what} '${text}' is out of range`)
  return n
}

/** Parses a whole number option within [min, max]. */
export function parseInteger(text: string, what: string, min: number, max: number): number {
  if (!/^-?\d+$/.test(text.trim())) throw new UsageError(`${what} '${text}' is not a whole number`)
  const n = Number(text)
  if (n < min || n > max) throw new UsageError(`${what} must be from ${min} to ${max}, not ${n}`)
  return n
}
