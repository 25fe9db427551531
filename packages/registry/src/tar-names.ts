import { createReadStream } from 'node:fs'
import { open } from 'node:fs/promises'
import { posix } from 'node:path'
import { createGunzip } from 'node:zlib'

const BLOCK = 512

/** A tar member name as layers compare them: no `./`, no leading or trailing `/`. */
export function cleanTarName(name: string): string {
  const p = posix.normalize(`/${name}`)
  return p === '/' ? '' : p.replace(/\/+$/, '').slice(1)
}

function cstring(b: Buffer, start: number, len: number): string {
  const s = b.subarray(start, start + len)
  const nul = s.indexOf(0)
  return s.subarray(0, nul < 0 ? len : nul).toString('utf8')
}

function octal(b: Buffer, start: number, len: number): number {
  const f = b.subarray(start, start + len)
  if ((f[0]! & 0x80) !== 0) {
    // GNU base-256 for sizes over 8 GiB.
    let n = f[0]! & 0x7f
    for (let i = 1; i < len; i++) n = n * 256 + f[i]!
    return n
  }
  const s = cstring(b, start, len).trim()
  return s === '' ? 0 : Number.parseInt(s, 8)
}

function paxPath(body: Buffer): string | undefined {
  let path: string | undefined
  let pos = 0
  while (pos < body.length) {
    const space = body.indexOf(0x20, pos)
    if (space < 0) break
    const len = Number(body.subarray(pos, space).toString())
    if (!Number.isSafeInteger(len) || len <= 0) break
    const record = body.subarray(space + 1, pos + len - 1).toString('utf8')
    const eq = record.indexOf('=')
    if (record.slice(0, eq) === 'path') path = record.slice(eq + 1)
    pos += len
  }
  return path
}

/**
 * The member names of a tar layer file (plain or gzipped), cleaned. Understands ustar prefixes, PAX `path`
 * records and GNU long names; reads headers only, skipping contents.
 */
export async function tarEntryNames(path: string, options: { signal?: AbortSignal } = {}): Promise<Set<string>> {
  const f = await open(path, 'r')
  const magic = Buffer.alloc(2)
  await f.read(magic, 0, 2, 0)
  await f.close()
  const file = createReadStream(path, { signal: options.signal })
  const stream = magic[0] === 0x1f && magic[1] === 0x8b ? file.pipe(createGunzip()) : file
  file.on('error', (err) => stream.destroy(err))
  const names = new Set<string>()
  let buf: Buffer = Buffer.alloc(0)
  let skip = 0
  let pending: { type: string; size: number; padded: number } | undefined
  let longName: string | undefined
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    buf = buf.length > 0 ? Buffer.concat([buf, chunk]) : chunk
    for (;;) {
      if (skip > 0) {
        const n = Math.min(skip, buf.length)
        skip -= n
        buf = buf.subarray(n)
        if (skip > 0) break
      }
      if (pending !== undefined) {
        if (buf.length < pending.padded) break
        const body = buf.subarray(0, pending.size)
        buf = buf.subarray(pending.padded)
        longName = pending.type === 'x' ? (paxPath(body) ?? longName) : cstring(body, 0, body.length)
        pending = undefined
        continue
      }
      if (buf.length < BLOCK) break
      const h = buf.subarray(0, BLOCK)
      buf = buf.subarray(BLOCK)
      if (h.every((b) => b === 0)) continue
      const size = octal(h, 124, 12)
      const padded = Math.ceil(size / BLOCK) * BLOCK
      const type = String.fromCharCode(h[156]!)
      if (type === 'L' || type === 'x') {
        pending = { type, size, padded }
        continue
      }
      if (type === 'g') {
        skip = padded
        continue
      }
      const prefix = cstring(h, 257, 6).startsWith('ustar') ? cstring(h, 345, 155) : ''
      const name = longName ?? (prefix !== '' ? `${prefix}/${cstring(h, 0, 100)}` : cstring(h, 0, 100))
      longName = undefined
      names.add(cleanTarName(name))
      // Links, devices, directories and fifos have no content even when size is set (as Go's archive/tar).
      skip = '123456'.includes(type) ? 0 : padded
    }
  }
  return names
}
