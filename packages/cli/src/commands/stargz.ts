import { once } from 'node:events'
import { isSha256Digest } from '@strata/base'
import {
  type Entry,
  EntryNotFoundError,
  type FileReadAt,
  fileReader,
  type Layer,
  NotAFileError,
  openLayer,
  readChunk,
  verifyLayer
} from '@strata/stargz'
import { type Command, type Context, type OptionSpec, UsageError } from '../command.js'
import { formatBytes, type Output } from '../output.js'
import { buildCommand } from './stargz-build.js'

const tocDigestOption: OptionSpec = {
  type: 'string',
  value: 'D',
  description:
    'expected TOC digest (the layer annotation containerd.io/snapshot/stargz/toc.digest): refuse any other TOC'
}

/** Opens BLOB (a local eStargz, stargz or zstd:chunked file) and its TOC for the length of `f`. */
async function withLayer<T>(ctx: Context, f: (blob: FileReadAt, layer: Layer) => Promise<T>): Promise<T> {
  const tocDigest = typeof ctx.opts['toc-digest'] === 'string' ? ctx.opts['toc-digest'] : undefined
  if (tocDigest !== undefined && !isSha256Digest(tocDigest)) {
    throw new UsageError(`--toc-digest '${tocDigest}' is not a digest like sha256:<64 hex digits>`)
  }
  const blob = await fileReader(ctx.args[0]!, { signal: ctx.signal })
  try {
    const layer = await openLayer(blob, { tocDigest, signal: ctx.signal })
    return await f(blob, layer)
  } finally {
    await blob.close()
  }
}

/** `p2pctl stargz verify BLOB`: every chunk digest and every file digest. */
const verifyCommand: Command = {
  name: 'verify',
  summary: 'check every chunk and file digest of a blob against its TOC',
  usage: 'BLOB',
  description: `Reads the footer and the TOC, then inflates every chunk and checks its digest and every file's
digest. Stops at the first failure and names the file and the digest (exit 1). Without --toc-digest the TOC
is only checked against itself: pass the manifest's annotation to check it is the TOC you expect.

Examples:
  p2pctl stargz verify layer.esgz
  p2pctl stargz verify layer.esgz --toc-digest sha256:4e6f...`,
  options: { 'toc-digest': tocDigestOption, json: { type: 'boolean', description: 'print one JSON object' } },
  args: { min: 1, max: 1 },
  run: (ctx) =>
    withLayer(ctx, async (blob, layer) => {
      const { out } = ctx
      if (ctx.opts['toc-digest'] === undefined && !out.json) {
        out.warn('no --toc-digest given: the TOC is checked only against itself')
      }
      let total = 0
      for (const e of layer.toc.entries.values()) if (e.type === 'reg') total += e.size
      const progress =
        out.stderr.isTTY === true && !out.json ? out.progress(`verifying ${ctx.args[0]}`, total) : undefined
      const result = await verifyLayer(blob, layer, { signal: ctx.signal, onProgress: (n) => progress?.update(n) })
      progress?.finish()
      if (out.json) {
        out.printJson({ result: 'OK', format: layer.format, ...result, tocDigest: layer.tocDigest })
      } else {
        out.print(
          `OK: ${layer.format} blob, ${result.files} files, ${result.chunks} chunks, ${formatBytes(result.bytes)} verified; toc-digest: ${layer.tocDigest}`
        )
      }
      return 0
    })
}

/** `p2pctl stargz cat BLOB PATH`: a file's bytes, verified chunk by chunk, to stdout. */
const catCommand: Command = {
  name: 'cat',
  summary: "write a file's bytes from a blob to stdout, verifying each chunk",
  usage: 'BLOB PATH',
  options: { 'toc-digest': tocDigestOption },
  args: { min: 2, max: 2 },
  run: (ctx) =>
    withLayer(ctx, async (blob, layer) => {
      const file = fileEntry(layer, ctx.args[1]!, ctx.args[0]!)
      for (const chunk of file.chunks) {
        const bytes = await readChunk(blob, layer, chunk, { signal: ctx.signal, path: file.path })
        await write(ctx.out, bytes)
      }
      return 0
    })
}

/** The regular file at `path` (following a hardlink); typed errors for anything else. */
function fileEntry(layer: Layer, path: string, blobPath: string): Entry {
  const entry = layer.toc.lookup(path)
  if (entry === undefined) {
    throw new EntryNotFoundError(`${path}: no such file in ${blobPath}`, {
      hint: `list the layer's files with 'p2pctl stargz ls ${blobPath}'`
    })
  }
  const file = entry.type === 'hardlink' ? layer.toc.lookup(entry.linkName!) : entry
  if (file?.type !== 'reg') {
    const what = entry.type === 'symlink' ? `a symlink to ${entry.linkName}` : `a ${file?.type ?? entry.type}`
    throw new NotAFileError(`${path} in ${blobPath} is ${what}, not a regular file`)
  }
  return file
}

async function write(out: Output, bytes: Uint8Array): Promise<void> {
  if (!out.stdout.write(bytes)) await once(out.stdout, 'drain')
}

/** `p2pctl stargz ls BLOB`: a long listing of the layer's entries. */
const lsCommand: Command = {
  name: 'ls',
  summary: 'list the entries of a blob like ls -l',
  usage: 'BLOB',
  description: `One line per entry, in path order: mode, uid/gid, size (major,minor for devices), mtime (UTC),
path, and the target of symlinks (-> target) and hardlinks (link to target).`,
  options: { 'toc-digest': tocDigestOption, json: { type: 'boolean', description: 'print one JSON array' } },
  args: { min: 1, max: 1 },
  run: (ctx) =>
    withLayer(ctx, async (_blob, layer) => {
      const entries = walk(layer)
      if (ctx.out.json) {
        ctx.out.printJson(
          entries.map((e) => ({
            path: e.path,
            type: e.type,
            mode: `0${e.mode.toString(8)}`,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: new Date(e.mtimeMs).toISOString(),
            linkName: e.linkName,
            digest: e.digest
          }))
        )
        return 0
      }
      const sizes = entries.map((e) =>
        e.type === 'char' || e.type === 'block' ? `${e.devMajor},${e.devMinor}` : String(e.size)
      )
      const owners = entries.map((e) => `${e.uid}/${e.gid}`)
      const sw = sizes.reduce((w, s) => Math.max(w, s.length), 0)
      const ow = owners.reduce((w, s) => Math.max(w, s.length), 0)
      const lines = entries.map((e, i) => {
        const target =
          e.type === 'symlink' ? ` -> ${e.linkName}` : e.type === 'hardlink' ? ` link to ${e.linkName}` : ''
        return `${modeString(e)} ${owners[i]!.padEnd(ow)} ${sizes[i]!.padStart(sw)} ${mtimeString(e.mtimeMs)} ${e.path}${target}`
      })
      if (lines.length > 0) ctx.out.print(lines.join('\n'))
      return 0
    })
}

/** Every entry but the root, depth first, children in name order. */
function walk(layer: Layer): Entry[] {
  const out: Entry[] = []
  const visit = (dir: string) => {
    for (const name of layer.toc.children(dir)) {
      const path = dir === '' ? name : `${dir}/${name}`
      const e = layer.toc.lookup(path)!
      out.push(e)
      if (e.type === 'dir') visit(path)
    }
  }
  visit('')
  return out
}

const TYPE_CHARS: Record<Entry['type'], string> = {
  dir: 'd',
  reg: '-',
  symlink: 'l',
  hardlink: 'h',
  char: 'c',
  block: 'b',
  fifo: 'p'
}

/** `drwxr-xr-x`, with s/S and t/T for setuid, setgid and sticky as ls shows them. */
function modeString(e: Pick<Entry, 'type' | 'mode'>): string {
  const m = e.mode
  const rwx = (shift: number, special: number, ch: string) => {
    const x = (m >> shift) & 1
    const s = m & special
    return `${(m >> (shift + 2)) & 1 ? 'r' : '-'}${(m >> (shift + 1)) & 1 ? 'w' : '-'}${s ? (x ? ch : ch.toUpperCase()) : x ? 'x' : '-'}`
  }
  return `${TYPE_CHARS[e.type]}${rwx(6, 0o4000, 's')}${rwx(3, 0o2000, 's')}${rwx(0, 0o1000, 't')}`
}

function mtimeString(ms: number): string {
  return new Date(ms).toISOString().replace('T', ' ').slice(0, 16)
}

/** `p2pctl stargz toc BLOB`: the TOC JSON exactly as stored (its sha256 is the TOC digest). */
const tocCommand: Command = {
  name: 'toc',
  summary: 'write the TOC JSON of a blob to stdout, byte for byte as stored',
  usage: 'BLOB',
  options: { 'toc-digest': tocDigestOption },
  args: { min: 1, max: 1 },
  run: (ctx) =>
    withLayer(ctx, async (_blob, layer) => {
      await write(ctx.out, layer.tocBytes)
      return 0
    })
}

/** `p2pctl stargz ...`: build, verify and inspect single eStargz / stargz / zstd:chunked blobs. */
export const stargzCommand: Command = {
  name: 'stargz',
  summary: 'build, verify and inspect eStargz layer blobs',
  subcommands: [buildCommand, verifyCommand, catCommand, lsCommand, tocCommand]
}
