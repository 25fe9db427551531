// The checks of a TOC entry's fields (whole numbers, strings, times, xattrs, names), and how an entry is named
// in the messages of the rules it breaks (toc.ts applies the rules).
import { InvalidTOCError } from './errors.js'
import { normaliseEntryName } from './names.js'

const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/

/** Normalises a TOC name, or refuses it (`..`, absolute names, NUL): the rule of names.ts, which the builder applies too. */
export function normaliseName(name: string, where: Where, what?: string): string {
  const n = normaliseEntryName(name, what)
  if (typeof n !== 'string') throw new InvalidTOCError(`${where}: ${n.refused}`)
  return n
}

/** Names a TOC entry in messages; the text is made only when an error needs it. */
export class Where {
  constructor(
    private readonly index: number,
    private readonly name: string
  ) {}

  toString(): string {
    return `TOC entry #${this.index} (${JSON.stringify(this.name.slice(0, 200))})`
  }
}

export function uint(e: Record<string, unknown>, key: string, where: Where): number | undefined {
  const v = e[key]
  if (v === undefined) return undefined
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new InvalidTOCError(`${where}: "${key}" must be a whole number from 0 to 2^53-1, not ${JSON.stringify(v)}`)
  }
  return v
}

export function str(e: Record<string, unknown>, key: string, where: Where): string | undefined {
  const v = e[key]
  if (v === undefined) return undefined
  if (typeof v !== 'string') throw new InvalidTOCError(`${where}: "${key}" must be a string`)
  return v
}

export function mtime(v: unknown, where: Where): number {
  if (v === undefined) return 0
  const ms = typeof v === 'string' && RFC3339.test(v) ? Date.parse(v) : Number.NaN
  if (!Number.isFinite(ms)) throw new InvalidTOCError(`${where}: modtime ${JSON.stringify(v)} is not an RFC 3339 time`)
  return ms
}

export function xattrs(v: unknown, where: Where): Record<string, Uint8Array> {
  if (v === undefined) return {}
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new InvalidTOCError(`${where}: "xattrs" must be an object`)
  }
  // No prototype: a TOC may name an xattr `__proto__`.
  const out: Record<string, Uint8Array> = Object.create(null)
  for (const [name, value] of Object.entries(v)) {
    if (name === '' || name.includes('\0'))
      throw new InvalidTOCError(`${where}: invalid xattr name ${JSON.stringify(name)}`)
    if (typeof value !== 'string' || !BASE64.test(value)) {
      throw new InvalidTOCError(`${where}: xattr ${name} is not base64`)
    }
    out[name] = new Uint8Array(Buffer.from(value, 'base64'))
  }
  return out
}
