/** `p2pctl stargz verify|cat|ls|toc` on a blob built by the reference, and on corrupted blobs. */
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { runCli } from '@test/cli.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  CHUNK,
  MTIME,
  makeSourceTree,
  type OracleBlob,
  oracleBuild,
  type SourceTree,
  sha256
} from '../../stargz/test/fixture.js'

let tree: SourceTree
let built: OracleBlob

beforeAll(async () => {
  tree = await makeSourceTree()
  built = await oracleBuild(tree, 'cli.blob', ['--chunk-size', String(CHUNK)])
})
afterAll(async () => {
  await tree?.cleanup()
})

/** Runs `p2pctl ...argv` in-process; stdout as bytes, stderr as text. */
async function p2p(...argv: string[]): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  const r = await runCli(argv)
  return { code: r.code, stdout: r.stdoutBytes, stderr: r.stderr }
}

/** A copy of the blob with `n` bytes zeroed at `offset`. */
async function corrupted(name: string, offset: number, n: number): Promise<string> {
  const bytes = await readFile(built.path)
  bytes.fill(0, offset, offset + n)
  const path = join(tree.dir, name)
  await writeFile(path, bytes)
  return path
}

describe('p2pctl stargz', () => {
  it('verify: prints a summary with counts and the TOC digest', async () => {
    const r = await p2p('stargz', 'verify', built.path, '--toc-digest', built.tocDigest)
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    expect(r.stdout.toString()).toMatch(
      new RegExp(
        `^OK: estargz blob, \\d+ files, \\d+ chunks, [\\d.]+ [KM]iB verified; toc-digest: ${built.tocDigest}\\n$`
      )
    )
    const json = await p2p('stargz', 'verify', built.path, '--json')
    expect(JSON.parse(json.stdout.toString())).toMatchObject({
      result: 'OK',
      format: 'estargz',
      tocDigest: built.tocDigest
    })
    const warned = await p2p('stargz', 'verify', built.path)
    expect(warned.stderr).toMatch(/warning: no --toc-digest given/)
  })

  it('verify: exits 1 naming the file and digest of the first bad chunk', async () => {
    const blob = await readFile(built.path)
    const json = JSON.parse((await p2p('stargz', 'toc', built.path)).stdout.toString()) as {
      entries: { name: string; type: string; offset?: number; chunkDigest?: string }[]
    }
    const victim = json.entries.find((e) => e.name === './sizes/text-300000' && e.type === 'chunk')!
    const path = await corrupted('bad-chunk.blob', victim.offset! + 40, 16)
    const r = await p2p('stargz', 'verify', path, '--toc-digest', built.tocDigest)
    expect(r.code).toBe(1)
    expect(r.stdout.length).toBe(0)
    expect(r.stderr).toMatch(new RegExp(`error: chunk ${victim.chunkDigest} of sizes/text-300000`))
    expect(r.stderr).toMatch(/hint: .*pull the layer again/)
    expect(blob.length).toBeGreaterThan(victim.offset!)
  })

  it('verify: exits 1 on a wrong TOC digest and on a blob with no footer; 2 on a malformed digest', async () => {
    const wrong = `sha256:${'9'.repeat(64)}`
    const r = await p2p('stargz', 'verify', built.path, '--toc-digest', wrong)
    expect(r.code).toBe(1)
    expect(r.stderr).toContain(`TOC digest mismatch: expected ${wrong}, the blob's TOC is ${built.tocDigest}`)
    const noFooter = await p2p('stargz', 'verify', tree.tar)
    expect(noFooter.code).toBe(1)
    expect(noFooter.stderr).toMatch(/no eStargz, stargz or zstd:chunked footer/)
    expect(noFooter.stderr).toMatch(/hint: the layer is not eStargz/)
    const missing = await p2p('stargz', 'verify', join(tree.dir, 'nope.blob'))
    expect(missing.code).toBe(1)
    expect(missing.stderr).toMatch(/cannot open blob .*nope.blob/)
    const usage = await p2p('stargz', 'verify', built.path, '--toc-digest', 'abc')
    expect(usage.code).toBe(2)
    expect(usage.stderr).toMatch(/--toc-digest 'abc' is not a digest/)
  })

  it('cat: writes a file byte for byte, and follows hardlinks', async () => {
    for (const p of ['sizes/random-200000', 'sizes/three-chunks', 'etc/hostname-hardlink', 'empty']) {
      const r = await p2p('stargz', 'cat', built.path, p)
      expect(r.code, r.stderr).toBe(0)
      expect(sha256(r.stdout), p).toBe(sha256(await readFile(join(tree.src, p))))
    }
  })

  it('cat: exits 1 for a missing path, a directory, a symlink, and a corrupted chunk', async () => {
    const missing = await p2p('stargz', 'cat', built.path, 'no/such/file')
    expect(missing.code).toBe(1)
    expect(missing.stderr).toMatch(/error: no\/such\/file: no such file in .*cli.blob/)
    expect(missing.stderr).toMatch(/hint: list the layer's files with 'p2pctl stargz ls/)
    expect((await p2p('stargz', 'cat', built.path, 'etc')).stderr).toMatch(/etc in .* is a dir, not a regular file/)
    expect((await p2p('stargz', 'cat', built.path, 'etc/relative-symlink')).stderr).toMatch(
      /is a symlink to hostname, not a regular file/
    )
    const json = JSON.parse((await p2p('stargz', 'toc', built.path)).stdout.toString()) as {
      entries: { name: string; type: string; offset?: number }[]
    }
    const e = json.entries.find((x) => x.name === './etc/hostname')!
    const bad = await p2p('stargz', 'cat', await corrupted('bad-cat.blob', e.offset! + 20, 8), 'etc/hostname')
    expect(bad.code).toBe(1)
    expect(bad.stderr).toMatch(/etc\/hostname/)
  })

  it('ls: one long line per entry, sorted, with modes, owners, sizes, times and link targets', async () => {
    const r = await p2p('stargz', 'ls', built.path)
    expect(r.code, r.stderr).toBe(0)
    const lines = r.stdout.toString().trimEnd().split('\n')
    const date = new Date(MTIME * 1000).toISOString().replace('T', ' ').slice(0, 16)
    const line = (path: string) => lines.find((l) => l.endsWith(` ${path}`) || l.includes(` ${path} `))
    expect(line('bin/setuid')).toMatch(new RegExp(`^-rwsr-xr-x 0/0 +10 ${date} bin/setuid$`))
    expect(line('bin/setgid')).toMatch(/^-rwxr-sr-x /)
    expect(line('tmp')).toMatch(/^drwxrwxrwt /)
    expect(line('owned')).toMatch(/^-rw-r----- 1234\/5678 +22 /)
    expect(line('fifo')).toMatch(/^prw-r--r-- /)
    expect(line('etc/relative-symlink')).toMatch(/^lrwxrwxrwx .* etc\/relative-symlink -> hostname$/)
    expect(line('etc/hostname-hardlink')).toMatch(/^h.* etc\/hostname-hardlink link to etc\/hostname$/)
    expect(line('sizes/random-200000')).toMatch(/ 200000 /)
    const paths = lines.map((l) => /^\S+ \S+ +\S+ \d{4}-\d\d-\d\d \d\d:\d\d (.*?)(?: -> .*| link to .*)?$/.exec(l)![1])
    expect(paths).toContain('xattr/file.txt')
    expect(paths).toEqual([...paths].sort())
    expect(paths).not.toContain('.no.prefetch.landmark')
    const json = JSON.parse((await p2p('stargz', 'ls', built.path, '--json')).stdout.toString()) as { path: string }[]
    expect(json.map((e) => e.path)).toEqual(paths)
  })

  it('toc: writes the TOC bytes exactly as stored (their sha256 is the TOC digest)', async () => {
    const r = await p2p('stargz', 'toc', built.path)
    expect(r.code).toBe(0)
    expect(sha256(r.stdout)).toBe(built.tocDigest)
  })
})
