import type { Writable } from 'node:stream'

/**
 * Everything the CLI prints goes through here: results to stdout, messages and progress to stderr.
 * With `--json` a command prints one JSON document to stdout and nothing else there.
 */
export class Output {
  json = false
  constructor(
    readonly stdout: Writable & { isTTY?: boolean } = process.stdout,
    readonly stderr: Writable & { isTTY?: boolean; columns?: number } = process.stderr
  ) {}

  /** A result line (or block) on stdout. */
  print(text: string): void {
    this.stdout.write(text.endsWith('\n') ? text : `${text}\n`)
  }

  /** `key: value` lines, or one JSON object with --json. */
  fields(obj: Record<string, unknown>): void {
    if (this.json) {
      this.printJson(obj)
      return
    }
    const lines = Object.entries(obj)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`)
    this.print(lines.join('\n'))
  }

  printJson(value: unknown): void {
    this.print(JSON.stringify(value, null, 2))
  }

  /** A message for the person at the terminal (stderr), never mixed into results. */
  info(text: string): void {
    this.stderr.write(`${text}\n`)
  }

  warn(text: string): void {
    this.stderr.write(`warning: ${text}\n`)
  }

  error(text: string): void {
    this.stderr.write(`${text}\n`)
  }

  /** Prints an error with its cause chain and, when the error carries one, a hint of what to do. */
  failure(err: unknown): void {
    this.stderr.write(`error: ${describeError(err)}\n`)
    const hint = (err as { hint?: unknown })?.hint
    if (typeof hint === 'string') this.stderr.write(`hint: ${hint}\n`)
    if (process.env.STRATA_DEBUG !== undefined && err instanceof Error && err.stack) this.stderr.write(`${err.stack}\n`)
  }

  /** A progress bar on a terminal; plain lines at most every few seconds otherwise. */
  progress(label: string, total?: number): Progress {
    return new Progress(this.stderr, label, total)
  }
}

export function describeError(err: unknown): string {
  const parts: string[] = []
  let e: unknown = err
  for (let depth = 0; e !== undefined && e !== null && depth < 6; depth++) {
    const msg = e instanceof Error ? e.message : String(e)
    if (!parts.some((p) => p.includes(msg))) parts.push(msg)
    e = e instanceof Error ? e.cause : undefined
  }
  return parts.join(': ')
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  let v = n
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024
    i++
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`
}

export class Progress {
  private done = 0
  private lastDraw = 0
  private readonly started = Date.now()
  private readonly tty: boolean

  constructor(
    private readonly stream: Writable & { isTTY?: boolean; columns?: number },
    private label: string,
    private total?: number,
    private readonly bytes = true
  ) {
    this.tty = stream.isTTY === true
  }

  setTotal(total: number): void {
    this.total = total
  }

  setLabel(label: string): void {
    this.label = label
    this.draw(true)
  }

  add(n: number): void {
    this.update(this.done + n)
  }

  update(done: number): void {
    this.done = done
    this.draw(false)
  }

  finish(message?: string): void {
    if (this.tty) this.stream.write('\r\x1b[K')
    this.stream.write(`${message ?? `${this.label}: done, ${this.amount()} in ${this.elapsed()}`}\n`)
  }

  private amount(): string {
    const fmt = (n: number) => (this.bytes ? formatBytes(n) : String(n))
    return this.total !== undefined ? `${fmt(this.done)} / ${fmt(this.total)}` : fmt(this.done)
  }

  private elapsed(): string {
    return `${((Date.now() - this.started) / 1000).toFixed(1)}s`
  }

  private draw(force: boolean): void {
    const now = Date.now()
    if (!force && now - this.lastDraw < (this.tty ? 100 : 5000)) return
    this.lastDraw = now
    const pct = this.total ? Math.min(1, this.done / this.total) : undefined
    if (!this.tty) {
      this.stream.write(`${this.label}: ${this.amount()}${pct !== undefined ? ` (${Math.floor(pct * 100)}%)` : ''}\n`)
      return
    }
    const width = Math.max(10, Math.min(40, (this.stream.columns ?? 80) - 60))
    const bar =
      pct === undefined ? '' : `[${'#'.repeat(Math.round(pct * width)).padEnd(width, '.')}] ${Math.floor(pct * 100)}% `
    this.stream.write(`\r\x1b[K${this.label} ${bar}${this.amount()} ${this.elapsed()}`)
  }
}
