import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const MiB = 1024 * 1024
const loader = new URL('../../../test/helpers/ts-loader.mjs', import.meta.url).href

/**
 * Runs in a child process so its peak RSS is the builder's alone. It generates a ~300 MB tar on the fly (two
 * 100 MiB files and 2000 files of 50 KiB, never held whole) and streams it through buildEstargz to /dev/null.
 * Node runs the TypeScript sources directly (with --experimental-transform-types: the builder has parameter
 * properties, which type stripping alone cannot run), through the repo's resolve hooks.
 */
const CHILD = `
import { createWriteStream, readFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { registerStrataHooks } from '${loader}'
registerStrataHooks({ strata: 'src' })
const { buildEstargz } = await import('@strata/stargz')

function header(name, size) {
  const b = Buffer.alloc(512)
  b.write(name, 0)
  b.write('0000644\\0', 100, 'latin1')
  b.write('0000000\\0', 108, 'latin1')
  b.write('0000000\\0', 116, 'latin1')
  b.write(size.toString(8).padStart(11, '0') + '\\0', 124, 'latin1')
  b.write('14000000000\\0', 136, 'latin1')
  b.write('0', 156, 'latin1')
  b.write('ustar\\x0000', 257, 'latin1')
  let sum = 0
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : b[i]
  b.write(sum.toString(8).padStart(6, '0') + '\\0 ', 148, 'latin1')
  return b
}
// Text-like content: compresses, but not to nothing.
const block = Buffer.from(randomBytes(${MiB}).map((c) => 0x41 + (c & 0x1f)))
async function* tar() {
  const files = [['big/a.bin', ${100 * MiB}], ['big/b.bin', ${100 * MiB}]]
  for (let i = 0; i < 2000; i++) files.push(['small/' + i + '.txt', ${50 * 1024}])
  for (const [name, size] of files) {
    yield header(name, size)
    for (let left = size; left > 0; left -= ${MiB}) yield Buffer.from(block.subarray(0, Math.min(left, ${MiB})))
    if (size % 512) yield Buffer.alloc(512 - (size % 512))
  }
  yield Buffer.alloc(1024)
}
const result = await buildEstargz(tar(), createWriteStream('/dev/null'), { gzipLevel: 1, tmpDir: process.argv[2] })
const hwm = Number(/VmHWM:\\s+(\\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024
console.log(JSON.stringify({ uncompressedSize: result.uncompressedSize, blobSize: result.blobSize, peakRss: hwm }))
`

let dir: string

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-build-memory-'))
  await writeFile(join(dir, 'child.mjs'), CHILD)
})

afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

describe('buildEstargz memory', () => {
  it('streams a 300 MB tar through in bounded memory', async () => {
    const { stdout } = await run(
      process.execPath,
      ['--experimental-transform-types', '--no-warnings', join(dir, 'child.mjs'), dir],
      { timeout: 120_000 }
    )
    const r = JSON.parse(stdout) as { uncompressedSize: number; blobSize: number; peakRss: number }
    expect(r.uncompressedSize).toBeGreaterThan(300 * 1e6)
    expect(r.blobSize).toBeLessThan(r.uncompressedSize)
    expect(r.peakRss).toBeLessThan(300 * MiB)
  }, 150_000)
})
