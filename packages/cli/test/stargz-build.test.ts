import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { runCli } from '@test/cli.js'
import { oracle, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

let dir: string

const p2pctlRun = (...argv: string[]) => runCli(argv)

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-build-cli-'))
  await mkdir(join(dir, 'src/etc'), { recursive: true })
  await writeFile(join(dir, 'src/etc/app.conf'), 'x'.repeat(20_000))
  await writeFile(join(dir, 'src/run.sh'), '#!/bin/sh\n')
  await run('tar', ['-C', join(dir, 'src'), '-cf', join(dir, 'in.tar'), 'etc', 'run.sh'])
  await run('tar', ['-C', join(dir, 'src'), '-czf', join(dir, 'in.tar.gz'), 'etc', 'run.sh'])
  await mkdir(join(dir, 'out'))
})

afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

describe('p2pctl stargz build', () => {
  it('writes OUT and prints the digests a manifest needs', async () => {
    const out = join(dir, 'out/layer.esgz')
    const r = await p2pctlRun('stargz', 'build', join(dir, 'in.tar'), out, '--chunk-size', '8KiB')
    expect(r.code).toBe(0)
    const lines = r.stdout.trim().split('\n')
    expect(lines.map((l) => l.split(': ')[0])).toEqual(['toc-digest', 'diff-id', 'uncompressed-size', 'blob-digest'])
    const fields = Object.fromEntries(lines.map((l) => l.split(': ') as [string, string]))
    const v = await oracle(['verify', out, '--toc-digest', fields['toc-digest']!])
    expect(v.result).toBe('OK')
    expect(v['diff-id']).toBe(fields['diff-id'])
    expect(v['blob-digest']).toBe(fields['blob-digest'])
    expect(v['multi-chunk-files']).toBe('1')
    expect(await readdir(join(dir, 'out'))).toEqual(['layer.esgz'])
  })

  it('reads gzipped input and a prioritized list, and prints JSON with --json', async () => {
    const out = join(dir, 'out/prio.esgz')
    await writeFile(join(dir, 'prio.txt'), '\n/run.sh\n\n')
    const r = await p2pctlRun(
      'stargz',
      'build',
      join(dir, 'in.tar.gz'),
      out,
      '--prioritized-file',
      join(dir, 'prio.txt'),
      '--gzip-level',
      '6',
      '--json'
    )
    expect(r.code).toBe(0)
    const json = JSON.parse(r.stdout) as Record<string, unknown>
    expect(Object.keys(json)).toEqual(['toc-digest', 'diff-id', 'uncompressed-size', 'blob-digest'])
    const v = await oracle(['verify', out, '--toc-digest', json['toc-digest'] as string])
    expect(v.result).toBe('OK')
    expect(v['prefetch-landmark']).toBe('.prefetch.landmark at entry 1')
  })

  it('leaves no OUT and no temporary file when the build fails', async () => {
    const whole = await readFile(join(dir, 'in.tar'))
    await writeFile(join(dir, 'cut.tar'), whole.subarray(0, 5000))
    const out = join(dir, 'out/cut.esgz')
    const r = await p2pctlRun('stargz', 'build', join(dir, 'cut.tar'), out)
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/^error: tar input is truncated at offset 5000/)
    expect(r.stderr).toMatch(/hint: /)
    expect((await readdir(join(dir, 'out'))).filter((n) => n.startsWith('.') || n.startsWith('cut'))).toEqual([])
  })

  it('rejects bad words with exit code 2', async () => {
    const out = join(dir, 'out/x.esgz')
    expect((await p2pctlRun('stargz', 'build', join(dir, 'in.tar'), out, '--gzip-level', '12')).code).toBe(2)
    expect((await p2pctlRun('stargz', 'build', join(dir, 'in.tar'), out, '--chunk-size', 'lots')).code).toBe(2)
    expect((await p2pctlRun('stargz', 'build', join(dir, 'in.tar'))).code).toBe(2)
    const missing = await p2pctlRun('stargz', 'build', join(dir, 'nope.tar'), out)
    expect(missing.code).toBe(1)
    expect(missing.stderr).toContain('nope.tar')
    const nowhere = await p2pctlRun('stargz', 'build', join(dir, 'in.tar'), join(dir, 'no/such/dir/x.esgz'))
    expect(nowhere.code).toBe(1)
    expect(nowhere.stderr).toMatch(/cannot create .*x\.esgz/)
  })
})
