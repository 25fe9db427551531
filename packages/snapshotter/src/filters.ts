// containerd's filter syntax, for List: each filter is selectors joined by ',' (all must hold); a snapshot
// matches the list when any filter holds. A selector is a field path, optionally an operator (`==`, `!=`, `~=`
// for a regular expression) and a value; a path alone asks that the field be present and not empty. Fields of a
// snapshot: name, parent, kind, labels.KEY. Parts are bare words or quoted: "..." (with Go escapes) or /.../.
// containerd itself lists with `labels."containerd.io/snapshot.ref"==CHAIN,parent=="PARENT"`.
import { SnapshotInvalid } from './errors.js'

export interface FilterableInfo {
  name: string
  parent: string
  kind: string
  labels: Record<string, string>
}

type Op = '==' | '!=' | '~='
interface Selector {
  path: string[]
  op?: Op
  value?: string
  regexp?: RegExp
}

export type Matcher = (info: FilterableInfo) => boolean

/** One matcher for the list (any filter matches); no filters (or only empty ones) match everything. */
export function parseFilters(filters: readonly string[]): Matcher {
  const parsed = filters.filter((f) => f.trim() !== '').map(parseFilter)
  if (parsed.length === 0) return () => true
  return (info) => parsed.some((selectors) => selectors.every((s) => matches(s, info)))
}

function matches(s: Selector, info: FilterableInfo): boolean {
  const [field, ...rest] = s.path
  let value: string | undefined
  if (field === 'labels') value = rest.length > 0 ? info.labels[rest.join('.')] : undefined
  else if (rest.length === 0 && (field === 'name' || field === 'parent' || field === 'kind')) value = info[field]
  if (s.op === undefined) return value !== undefined && value !== ''
  if (s.op === '==') return value === s.value
  if (s.op === '!=') return value !== s.value
  return value !== undefined && s.regexp!.test(value)
}

function parseFilter(text: string): Selector[] {
  const fail = (why: string): never => {
    throw new SnapshotInvalid(`filter ${JSON.stringify(text)}: ${why}`)
  }
  let i = 0
  const skipSpace = () => {
    while (i < text.length && /\s/.test(text[i]!)) i++
  }
  const quoted = (): string => {
    const quote = text[i]!
    let out = ''
    i++
    while (i < text.length && text[i] !== quote) {
      const c = text[i]!
      if (c === '\\' && quote === '"') {
        i++
        const e = text[i]
        if (e === undefined) fail('an escape at the end')
        const simple: Record<string, string> = { n: '\n', t: '\t', r: '\r', '"': '"', '\\': '\\', '/': '/' }
        if (simple[e!] !== undefined) {
          out += simple[e!]
          i++
        } else if (e === 'x' || e === 'u' || e === 'U') {
          const n = e === 'x' ? 2 : e === 'u' ? 4 : 8
          const hex = text.slice(i + 1, i + 1 + n)
          if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length !== n) fail(`a bad \\${e} escape`)
          out += String.fromCodePoint(Number.parseInt(hex, 16))
          i += 1 + n
        } else fail(`an unknown escape \\${e}`)
        continue
      }
      if (c === '\\' && quote === '/' && text[i + 1] === '/') {
        out += '/'
        i += 2
        continue
      }
      out += c
      i++
    }
    if (i >= text.length) fail('a quote is not closed')
    i++
    return out
  }
  const field = (): string => {
    if (text[i] === '"' || text[i] === '/') return quoted()
    const m = /^[A-Za-z0-9_-]+/.exec(text.slice(i))
    if (m === null) return fail(`a field name expected at ${i}`)
    i += m[0].length
    return m[0]
  }
  const selectors: Selector[] = []
  for (;;) {
    skipSpace()
    const path = [field()]
    while (text[i] === '.') {
      i++
      path.push(field())
    }
    skipSpace()
    const selector: Selector = { path }
    const op = text.slice(i, i + 2)
    if (op === '==' || op === '!=' || op === '~=') {
      i += 2
      skipSpace()
      let value: string
      if (text[i] === '"' || text[i] === '/') value = quoted()
      else {
        const m = /^[^,\s"]*/.exec(text.slice(i))!
        value = m[0]
        i += value.length
      }
      selector.op = op
      selector.value = value
      if (op === '~=') {
        try {
          selector.regexp = new RegExp(value)
        } catch {
          fail(`${JSON.stringify(value)} is not a regular expression`)
        }
      }
    }
    selectors.push(selector)
    skipSpace()
    if (i >= text.length) return selectors
    if (text[i] !== ',') fail(`',' expected at ${i}`)
    i++
  }
}
