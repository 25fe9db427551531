import { createHash, randomBytes } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import {
  chmod,
  link,
  lstat,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  readlink,
  rm,
  symlink,
  writeFile
} from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { oracle, oraclePath, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type BuildOptions, buildEstargz, fileReader, openLayer, verifyLayer } from '../src/index.js'

const CHUNK = 4096
const LONG_DIR = `${'d'.repeat(120)}`
const LONG_FILE = `${LONG_DIR}/${'f'.repeat(150)}.txt`
const UNICODE = 'ünïcødé-文件-🙂.txt'
const ESCAPED = 'a<b>&c "q".txt'
const SIZES = [0, 1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 1, 100_000]

let dir: string
let src: string

/** A source tree with what a layer can hold: every entry type, long and odd names, xattrs, special modes. */
async function makeTree(root: string): Promise<void> {
  await mkdir(join(root, 'dir/sub'), { recursive: true })
  for (const n of SIZES) await writeFile(join(root, `dir/size-${n}.bin`), randomBytes(n))
  await mkdir(join(root, LONG_DIR))
  await writeFile(join(root, LONG_FILE), 'long name\n')
  await writeFile(join(root, UNICODE), 'unicode\n')
  await writeFile(join(root, ESCAPED), 'escapes\n')
  await symlink('a.txt', join(root, 'dir/link'))
  await symlink('s'.repeat(150), join(root, 'dir/long-link'))
  await link(join(root, `dir/size-${CHUNK + 1}.bin`), join(root, 'dir/hard'))
  await run('mkfifo', [join(root, 'dir/fifo')])
  await writeFile(join(root, 'dir/sub/setuid'), '#!/bin/sh\n')
  await chmod(join(root, 'dir/sub/setuid'), 0o4755)
  await mkdir(join(root, 'sticky'))
  await chmod(join(root, 'sticky'), 0o1777)
  await mkdir(join(root, 'empty-dir'))
  await run('setfattr', ['-n', 'user.text', '-v', 'v<&>', join(root, 'dir/size-1.bin')])
  await run('setfattr', ['-n', 'user.bin', '-v', '0x00ff10', join(root, 'dir/size-1.bin')])
  await run('setfattr', ['-n', 'user.empty', join(root, ESCAPED)])
  // ids past the octal field (base-256 in gnu tars), and times to round, before 1970, and at the epoch
  await run('chown', ['-h', '3000000:3000001', join(root, 'dir/size-0.bin')])
  await run('touch', ['-d', '2020-01-01 00:00:00.7', join(root, UNICODE)])
  await run('touch', ['-d', '1960-06-01 12:00:00', join(root, 'dir/size-2.bin')])
  await run('touch', ['-d', '@0', join(root, ESCAPED)])
}

async function build(input: string, output: string, options?: BuildOptions) {
  return buildEstargz(createReadStream(input), createWriteStream(output), options)
}

async function toc(blob: string): Promise<string> {
  return (await run(oraclePath(), ['toc', blob])).stdout
}

/** TOC JSON with compressed offsets zeroed: what must equal the reference's (offsets differ with the zlib). */
function withoutOffsets(json: string): string {
  return json.replace(/"offset": \d+/g, '"offset": 0')
}

function names(json: string): string[] {
  return (JSON.parse(json) as { entries: { name: string; type: string }[] }).entries
    .filter((e) => e.type !== 'chunk')
    .map((e) => e.name)
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-build-test-'))
  src = join(dir, 'src')
  await makeTree(src)
  await run('tar', ['--format=pax', '--xattrs', '--xattrs-include=*', '-C', src, '-cf', join(dir, 'pax.tar'), '.'])
  await run('tar', ['--format=gnu', '-C', src, '-czf', join(dir, 'gnu.tar.gz'), '.'])
})

afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

describe('buildEstargz', () => {
  it('writes a blob the reference verifies, with the reference TOC semantics and Go JSON bytes', async () => {
    const blob = join(dir, 'pax.esgz')
    const r = await build(join(dir, 'pax.tar'), blob, { chunkSize: CHUNK })
    const v = await oracle(['verify', blob, '--toc-digest', r.tocDigest])
    expect(v.result).toBe('OK')
    expect(v['diff-id']).toBe(r.diffId)
    expect(v['uncompressed-size']).toBe(String(r.uncompressedSize))
    expect(v['blob-digest']).toBe(r.blobDigest)
    expect(v['blob-size']).toBe(String(r.blobSize))
    expect(v['toc-offset']).toMatch(new RegExp(`^${r.tocOffset} `))
    expect(v['prefetch-landmark']).toBe('.no.prefetch.landmark at entry 0')
    expect(r.annotations).toEqual({
      'containerd.io/snapshot/stargz/toc.digest': r.tocDigest,
      'io.containers.estargz.uncompressed-size': String(r.uncompressedSize)
    })

    const ours = await toc(blob)
    expect(`sha256:${createHash('sha256').update(ours).digest('hex')}`).toBe(r.tocDigest)
    await oracle(['build', join(dir, 'pax.tar'), join(dir, 'pax-ref.esgz'), '--chunk-size', String(CHUNK)])
    const ref = await toc(join(dir, 'pax-ref.esgz'))
    // Same entries, fields, order, escapes and indentation: only the compressed offsets may differ.
    expect(withoutOffsets(ours)).toBe(withoutOffsets(ref))
    expect(ours).toContain('\\u003cb\\u003e\\u0026c \\"q\\".txt')
    expect(ours).toContain(UNICODE)
    expect(ours).toContain('"user.bin": "AP8Q"')
    expect(ours).toContain('"mode": 2541') // 04755 of the setuid file
  })

  it('is a tar.gz that tar reads, and unpacks to the source files', async () => {
    const blob = join(dir, 'pax.esgz')
    const listed = (await run('tar', ['-tzf', blob])).stdout.split('\n').filter(Boolean)
    const input = (await run('tar', ['-tf', join(dir, 'pax.tar')])).stdout.split('\n').filter(Boolean)
    expect(listed).toEqual(['.no.prefetch.landmark', ...input, 'stargz.index.json'])

    const unpacked = join(dir, 'unpacked.tar')
    await run(oraclePath(), ['unpack', blob, unpacked])
    const dst = join(dir, 'dst')
    await mkdir(dst)
    await run('tar', ['--xattrs', '--xattrs-include=*', '-xpf', unpacked, '-C', dst])
    await rm(join(dst, '.no.prefetch.landmark'))
    expect(await snapshot(dst)).toEqual(await snapshot(src))
    const a = await lstat(join(dst, 'dir/hard'))
    const b = await lstat(join(dst, `dir/size-${CHUNK + 1}.bin`))
    expect(a.ino).toBe(b.ino)
    for (const f of ['dir/size-1.bin', ESCAPED]) {
      const attrs = async (root: string) =>
        (await run('getfattr', ['-d', '-m', '-', '-e', 'hex', join(root, f)])).stdout.replace(/^# file:.*\n/, '')
      expect(await attrs(dst)).toBe(await attrs(src))
    }
  })

  it('puts prioritized files, their parents and hardlink targets before .prefetch.landmark (gzipped gnu tar)', async () => {
    const input = join(dir, 'gnu.tar.gz')
    const blob = join(dir, 'prio.esgz')
    // tar stores the first of two hardlinked paths as the file, the second as a link to it
    const line = (await run('tar', ['-tvzf', input])).stdout.split('\n').find((l) => l.includes(' link to '))!
    const [, hardlink, target] = / (\S+) link to (\S+)$/.exec(line)!
    const prioritized = [hardlink!.replace(/^\.\//, ''), `/${LONG_FILE}`, `./${UNICODE}`]
    const r = await build(input, blob, { chunkSize: CHUNK, prioritizedFiles: prioritized })
    const v = await oracle(['verify', blob, '--toc-digest', r.tocDigest])
    expect(v.result).toBe('OK')
    const ours = await toc(blob)
    const first = names(ours)
    expect(first.slice(0, first.indexOf('.prefetch.landmark'))).toEqual([
      './',
      './dir/',
      target,
      hardlink,
      `./${LONG_DIR}/`,
      `./${LONG_FILE}`,
      `./${UNICODE}`
    ])
    // strata's own reader opens it, finds the prioritized files, and every chunk verifies
    const reader = await fileReader(blob)
    try {
      const layer = await openLayer(reader, { tocDigest: r.tocDigest })
      expect(layer.tocOffset).toBe(r.tocOffset)
      const paths = layer.toc.prioritized.map((e) => e.path)
      expect(paths).toEqual(expect.arrayContaining([LONG_FILE, UNICODE, hardlink!.replace(/^\.\//, '')]))
      expect(layer.toc.prefetchEnd).toBeGreaterThan(0)
      expect(layer.toc.prefetchEnd).toBeLessThan(r.tocOffset)
      const checked = await verifyLayer(reader, layer)
      expect(checked.bytes).toBe(SIZES.reduce((a, b) => a + b, 0) + 'long name\nunicode\nescapes\n#!/bin/sh\n'.length)
    } finally {
      await reader.close()
    }
    await writeFile(join(dir, 'prio.txt'), prioritized.join('\n'))
    await oracle([
      'build',
      input,
      join(dir, 'prio-ref.esgz'),
      '--chunk-size',
      String(CHUNK),
      '--prioritized-file',
      join(dir, 'prio.txt')
    ])
    expect(withoutOffsets(ours)).toBe(withoutOffsets(await toc(join(dir, 'prio-ref.esgz'))))
  })

  it('keeps the last of duplicate paths and drops landmarks and TOCs found in the input, as the reference', async () => {
    const t = join(dir, 'dups')
    await mkdir(join(t, 'x'), { recursive: true })
    await writeFile(join(t, 'x/f'), 'first')
    await writeFile(join(t, '.prefetch.landmark'), 'old')
    await writeFile(join(t, 'stargz.index.json'), '{}')
    const tar = join(dir, 'dups.tar')
    await run('tar', ['-C', t, '-cf', tar, 'x', 'x/f', '.prefetch.landmark', 'stargz.index.json'])
    await writeFile(join(t, 'x/f'), 'second, longer')
    await run('tar', ['-C', t, '-rf', tar, 'x/f'])
    const blob = join(dir, 'dups.esgz')
    const r = await build(tar, blob)
    expect((await oracle(['verify', blob, '--toc-digest', r.tocDigest])).result).toBe('OK')
    const ours = await toc(blob)
    expect(names(ours)).toEqual(['.no.prefetch.landmark', 'x/', 'x/f'])
    expect((await run(oraclePath(), ['cat', blob, 'x/f'])).stdout).toBe('second, longer')
    await oracle(['build', tar, join(dir, 'dups-ref.esgz')])
    expect(withoutOffsets(ours)).toBe(withoutOffsets(await toc(join(dir, 'dups-ref.esgz'))))
  })

  it('converts an empty tar into a blob with just the landmark', async () => {
    const tar = join(dir, 'empty.tar')
    await writeFile(tar, Buffer.alloc(1024))
    const blob = join(dir, 'empty.esgz')
    const r = await build(tar, blob)
    expect((await oracle(['verify', blob, '--toc-digest', r.tocDigest])).result).toBe('OK')
    expect(names(await toc(blob))).toEqual(['.no.prefetch.landmark'])
  })
})

interface Node {
  type: string
  mode: number
  content?: string
  target?: string
}

/** Type, permission bits, content hash and link target of every path under root. */
async function snapshot(root: string, rel = ''): Promise<Record<string, Node>> {
  const out: Record<string, Node> = {}
  for (const name of (await readdir(join(root, rel))).sort()) {
    const p = rel === '' ? name : `${rel}/${name}`
    const st = await lstat(join(root, p))
    const node: Node = { type: 'other', mode: st.mode & 0o7777 }
    if (st.isFile()) {
      node.type = 'file'
      node.content = createHash('sha256')
        .update(await readFile(join(root, p)))
        .digest('hex')
    } else if (st.isSymbolicLink()) {
      node.type = 'symlink'
      node.target = await readlink(join(root, p))
      node.mode = 0
    } else if (st.isFIFO()) {
      node.type = 'fifo'
    } else if (st.isDirectory()) {
      node.type = 'dir'
      Object.assign(out, await snapshot(root, p))
    }
    out[p] = node
  }
  return out
}
