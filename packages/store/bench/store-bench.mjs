// Chunk store throughput: put (write + rename + batched index; fsync in background checkpoints) and get (one file read) on the disk
// store, and the memory store for reference.
// Run: pnpm exec tsc -b packages/store && node packages/store/bench/store-bench.mjs [DIR]
// DIR (default: a temp dir under os.tmpdir()) selects the file system measured.
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createMemoryStore, openDiskStore } from '../dist/index.js'

const base = process.argv[2] ?? tmpdir()
const CONCURRENCY = 16

function chunks(n, size) {
  return Array.from({ length: n }, () => {
    const bytes = randomBytes(size)
    return { digest: `sha256:${createHash('sha256').update(bytes).digest('hex')}`, bytes }
  })
}

async function timed(items, fn) {
  let next = 0
  const start = process.hrtime.bigint()
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < items.length) await fn(items[next++])
    })
  )
  return Number(process.hrtime.bigint() - start) / 1e9
}

function report(label, n, size, seconds) {
  const ops = Math.round(n / seconds)
  const mib = ((n * size) / seconds / 2 ** 20).toFixed(1)
  console.log(`${label.padEnd(34)} ${String(ops).padStart(7)} ops/s ${mib.padStart(8)} MiB/s`)
}

async function run(label, store, n, size) {
  const data = chunks(n, size)
  report(`${label} put ${size >> 10} KiB`, n, size, await timed(data, (c) => store.put(c.digest, c.bytes)))
  report(`${label} get ${size >> 10} KiB`, n, size, await timed(data, (c) => store.get(c.digest)))
  // A FUSE read is one get at a time per reader: measure latency-bound gets too.
  const start = process.hrtime.bigint()
  for (const c of data.slice(0, 1000)) await store.get(c.digest)
  report(`${label} get ${size >> 10} KiB (serial)`, 1000, size, Number(process.hrtime.bigint() - start) / 1e9)
}

for (const size of [4 << 10, 64 << 10]) {
  const n = size === 4 << 10 ? 4000 : 1500
  for (const fsync of [true, false]) {
    const dir = await mkdtemp(join(base, 'strata-bench-'))
    const store = await openDiskStore(dir, { fsync })
    await run(`disk fsync=${fsync}`, store, n, size)
    await store.close()
    // Open = load the index + the repair pass's listing of every fan-out directory.
    const start = process.hrtime.bigint()
    const reopened = await openDiskStore(dir, { fsync })
    const ms = Number(process.hrtime.bigint() - start) / 1e6
    console.log(`${`disk open with ${n} chunks`.padEnd(34)} ${ms.toFixed(0).padStart(7)} ms`)
    await reopened.close()
    await rm(dir, { recursive: true, force: true })
  }
  const memory = createMemoryStore()
  await run('memory', memory, n, size)
  await memory.close()
}
