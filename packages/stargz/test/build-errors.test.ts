import { createWriteStream } from 'node:fs'
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough, Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { oraclePath, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { buildEstargz } from '../src/index.js'

let dir: string
let spoolDir: string
let good: Buffer

/** A ustar header block; `size` may be raw field bytes to forge hostile numbers. */
function header(name: string, opts: { size?: number | Buffer; type?: string; link?: string } = {}): Buffer {
  const b = Buffer.alloc(512)
  b.write(name, 0)
  b.write(opts.link ?? '', 157)
  b.write('0000644\0', 100, 'latin1')
  b.write('0000000\0', 108, 'latin1')
  b.write('0000000\0', 116, 'latin1')
  const size = opts.size ?? 0
  if (typeof size === 'number') b.write(`${size.toString(8).padStart(11, '0')}\0`, 124, 'latin1')
  else size.copy(b, 124)
  b.write('14000000000\0', 136, 'latin1')
  b.write(opts.type ?? '0', 156, 'latin1')
  b.write('ustar\x0000', 257, 'latin1')
  let sum = 0
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : b[i]!
  b.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1')
  return b
}

/** Builds from bytes; returns the error and what reached the output. */
async function fail(input: Buffer, prioritizedFiles?: string[]) {
  const out = new PassThrough()
  let written = 0
  out.on('data', (d: Buffer) => {
    written += d.length
  })
  const err = await buildEstargz(Readable.from([input]), out, { prioritizedFiles, tmpDir: spoolDir }).then(
    () => undefined,
    (e: unknown) => e as Error & { code: string; offset?: number; hint?: string }
  )
  expect(err).toBeDefined()
  expect(written).toBe(0)
  expect(await readdir(spoolDir)).toEqual([])
  return err!
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-build-errors-'))
  spoolDir = join(dir, 'spool')
  await mkdir(spoolDir)
  await mkdir(join(dir, 'src/d'), { recursive: true })
  await writeFile(join(dir, 'src/d/f'), Buffer.alloc(10_000, 7))
  await run('tar', ['--format=gnu', '-C', join(dir, 'src'), '-cf', join(dir, 'good.tar'), 'd'])
  good = await readFile(join(dir, 'good.tar'))
})

afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

describe('buildEstargz on bad input', () => {
  it('reports a tar cut short inside a file, with the offset', async () => {
    const err = await fail(good.subarray(0, 1024 + 5000))
    expect(err.name).toBe('TarTruncatedError')
    expect(err.code).toBe('ERR_STARGZ_TAR_TRUNCATED')
    expect(err.offset).toBe(1024 + 5000)
    expect(err.hint).toMatch(/cut short/)
  })

  it('reports a tar cut short inside a header', async () => {
    const err = await fail(good.subarray(0, 512 + 100))
    expect(err.name).toBe('TarTruncatedError')
    expect(err.offset).toBe(512)
  })

  it('reports a corrupt header checksum with the header offset', async () => {
    const bad = Buffer.from(good)
    bad[512 + 2] = 0x58
    const err = await fail(bad)
    expect(err.name).toBe('TarHeaderError')
    expect(err.code).toBe('ERR_STARGZ_TAR_HEADER')
    expect(err.offset).toBe(512)
    expect(err.message).toMatch(/checksum/)
  })

  it('refuses hostile sizes', async () => {
    const huge = Buffer.from([0x80, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]) // 2^62 in base-256
    expect((await fail(header('f', { size: huge }))).name).toBe('TarHeaderError')
    const negative = Buffer.alloc(12, 0xff) // -1 in base-256
    const err = await fail(header('f', { size: negative }))
    expect(err.name).toBe('TarHeaderError')
    expect(err.message).toMatch(/negative size/)
    const bigPax = await fail(header('PaxHeaders/f', { type: 'x', size: 2 << 20 }))
    expect(bigPax.name).toBe('TarHeaderError')
    expect(bigPax.message).toMatch(/extended header/)
    const comment = `1048576 comment=${'c'.repeat((1 << 20) - 17)}\n` // one valid 1 MiB PAX record
    const chain = Array.from({ length: 5 }, () =>
      Buffer.concat([header('PaxHeaders/f', { type: 'x', size: 1 << 20 }), Buffer.from(comment)])
    )
    const chained = await fail(Buffer.concat(chain))
    expect(chained.message).toMatch(/extended headers of more than/)
    const record = '30 size=99999999999999999999\n'
    const paxSize = Buffer.concat([header('PaxHeaders/f', { type: 'x', size: record.length }), Buffer.alloc(512)])
    paxSize.write(record, 512)
    expect((await fail(Buffer.concat([paxSize, header('f')]))).name).toBe('TarHeaderError')
    // 8 GiB declared, 1 KiB present
    const lying = await fail(Buffer.concat([header('f', { size: 8 * 1024 ** 3 - 1 }), Buffer.alloc(1024)]))
    expect(lying.name).toBe('TarTruncatedError')
  })

  it('refuses a gzipped input that does not inflate', async () => {
    const gz = gzipSync(good)
    gz.fill(0x41, 20, gz.length - 20)
    const err = await fail(gz)
    expect(err.name).toBe('InputDecompressError')
    expect(err.hint).toMatch(/corrupted/)
  })

  it('refuses entries eStargz cannot carry', async () => {
    const global = Buffer.concat([header('pax_global_header', { type: 'g', size: 0 }), header('f')])
    const err = await fail(global)
    expect(err.name).toBe('UnsupportedTarEntryError')
    expect(err.message).toMatch(/global PAX/)
  })

  it('names a prioritized file that is not in the tar', async () => {
    const err = await fail(good, ['d/f', 'd/missing'])
    expect(err.name).toBe('PrioritizedFileNotFoundError')
    expect(err.message).toContain('d/missing')
  })

  it('survives a hardlink cycle among prioritized files', async () => {
    const tar = Buffer.concat([
      header('a', { type: '1', link: 'b' }),
      header('b', { type: '1', link: 'a' }),
      Buffer.alloc(1024)
    ])
    const blob = join(dir, 'cycle.esgz')
    await buildEstargz(Readable.from([tar]), createWriteStream(blob), { prioritizedFiles: ['a'], tmpDir: spoolDir })
    const toc = JSON.parse((await run(oraclePath(), ['toc', blob])).stdout) as { entries: { name: string }[] }
    expect(toc.entries.map((e) => e.name)).toEqual(['b', 'a', '.prefetch.landmark'])
  })

  it('fails with the error of the output when the output cannot be written', async () => {
    const out = createWriteStream(join(dir, 'no/such/dir/out.esgz'))
    const err = await buildEstargz(Readable.from([good]), out, { tmpDir: spoolDir }).catch(
      (e: NodeJS.ErrnoException) => e
    )
    expect((err as NodeJS.ErrnoException).code).toBe('ENOENT')
    expect(await readdir(spoolDir)).toEqual([])
  })

  it('stops when aborted in the middle, destroys the output and removes its spool', async () => {
    const size = 16 << 20
    const tar = Buffer.concat([header('big', { size }), Buffer.alloc(size, 0x61), Buffer.alloc(1024)])
    const controller = new AbortController()
    const out = new PassThrough()
    out.resume()
    const err = await buildEstargz(Readable.from([tar]), out, {
      chunkSize: 1 << 20,
      tmpDir: spoolDir,
      signal: controller.signal,
      onProgress: () => controller.abort(new Error('enough'))
    }).catch((e: Error) => e)
    expect((err as Error).name).toBe('AbortError')
    expect(out.destroyed).toBe(true)
    expect(await readdir(spoolDir)).toEqual([])
  })

  it('stops when aborted and removes its spool', async () => {
    const controller = new AbortController()
    controller.abort(new Error('stop'))
    const err = await buildEstargz(Readable.from([good]), new PassThrough(), {
      signal: controller.signal,
      tmpDir: spoolDir
    }).catch((e: Error) => e)
    expect((err as Error).message).toBe('stop')
    expect(await readdir(spoolDir)).toEqual([])
  })
})
