import type { TOCEntryJSON, TOCJSON } from './types.js'

/** TOC entry fields in the order of the reference's Go struct (estargz.TOCEntry); all but name and type omitempty. */
const FIELDS = [
  'name',
  'type',
  'size',
  'modtime',
  'linkName',
  'mode',
  'uid',
  'gid',
  'userName',
  'groupName',
  'offset',
  'devMajor',
  'devMinor',
  'xattrs',
  'digest',
  'chunkOffset',
  'chunkSize',
  'chunkDigest'
] as const satisfies readonly (keyof TOCEntryJSON)[]

/**
 * The TOC as the reference writes it: Go's json.MarshalIndent(toc, "", "\t") of estargz.JTOC. Field order of
 * the Go struct, zero values omitted, map keys sorted, tab indentation, no trailing newline, and Go's string
 * escapes (`<`, `>`, `&`, U+2028, U+2029 as \u escapes; \b and \f as \u0008 and \u000c, as Go 1.19 does).
 */
export function encodeTOC(toc: TOCJSON): string {
  const lines = ['{', `\t"version": ${toc.version},`]
  if (toc.entries.length === 0) {
    lines.push('\t"entries": []', '}')
    return lines.join('\n')
  }
  lines.push('\t"entries": [')
  toc.entries.forEach((e, i) => {
    const fields: string[] = []
    for (const key of FIELDS) {
      const v = e[key]
      if (key !== 'name' && key !== 'type' && (v === undefined || v === 0 || v === '')) continue
      if (key === 'xattrs') {
        const x = v as Record<string, string>
        const keys = Object.keys(x).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)))
        if (keys.length === 0) continue
        const inner = keys.map((k) => `\t\t\t\t${goString(k)}: ${goString(x[k]!)}`)
        fields.push(`\t\t\t"xattrs": {\n${inner.join(',\n')}\n\t\t\t}`)
        continue
      }
      fields.push(`\t\t\t"${key}": ${typeof v === 'number' ? String(v) : goString(v as string)}`)
    }
    lines.push('\t\t{', fields.join(',\n'), i === toc.entries.length - 1 ? '\t\t}' : '\t\t},')
  })
  lines.push('\t]', '}')
  return lines.join('\n')
}

const ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t' }

/** A JSON string literal as Go's encoding/json writes it (HTML-safe). */
export function goString(s: string): string {
  return `"${s.replace(
    /[\u0000-\u001f"\\<>&\u2028\u2029]/g,
    (c) => ESCAPES[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`
  )}"`
}

/**
 * A tar modification time as the reference stores it: RFC 3339 in UTC, rounded to the second (halves up);
 * empty for the Unix epoch itself (`t.Unix() == 0`), which the TOC then omits.
 */
export function formatModtime(sec: number, nsec: number): string {
  if (sec === 0) return ''
  const rounded = sec + (nsec >= 500_000_000 ? 1 : 0)
  const d = new Date(rounded * 1000)
  if (Number.isNaN(d.getTime())) return ''
  const year = d.getUTCFullYear()
  const pad = (n: number) => String(n).padStart(2, '0')
  return (
    `${year < 0 ? '-' : ''}${String(Math.abs(year)).padStart(4, '0')}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}` +
    `T${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}Z`
  )
}
