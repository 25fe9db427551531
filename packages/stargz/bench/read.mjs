#!/usr/bin/env node
// Chunk read + verify throughput of the stargz reader, against a baseline measured in the same run:
// one streaming gunzip + sha256 of the same compressed payload (the least work any reader must do).
//
//   pnpm exec tsc -b packages/stargz && node packages/stargz/bench/read.mjs [BLOB] [--mib N] [--zstd] [--rounds N]
//
// Without BLOB it makes a layer of N MiB (default 64: large files of text-like data + 2000 small files),
// tars it with GNU tar and builds the blob with the reference (the oracle, default 4 MiB chunks; gzip level 6,
// or zstd:chunked with --zstd).
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { createReadStream, existsSync } from 'node:fs'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { availableParallelism, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { fileURLToPath } from 'node:url'
import { createGunzip, createZstdDecompress } from 'node:zlib'
import { fileReader, openLayer, readChunk, verifyLayer } from '../dist/index.js'

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '../../..')
const args = process.argv.slice(2)
const mibAt = args.indexOf('--mib')
const mib = mibAt >= 0 ? Number(args[mibAt + 1]) : 64
const roundsAt = args.indexOf('--rounds')
const rounds = roundsAt >= 0 ? Number(args[roundsAt + 1]) : 3
const given = args.find((a, i) => !a.startsWith('--') && !['--mib', '--rounds'].includes(args[i - 1]))

/** Text-like bytes (words from a small vocabulary, seeded): compresses about 3:1 like binaries and text do. */
function textLike(size, seed) {
  const words =
    'the of and to in is for on that by with as at from this be are or an it not which have data file'.split(' ')
  const out = Buffer.alloc(size)
  let x = seed >>> 0 || 1
  let i = 0
  while (i < size) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    const w = x % 7 === 0 ? (x % 100000).toString(36) : words[x % words.length]
    i += out.write(`${w}${x % 11 === 0 ? '\n' : ' '}`, i)
  }
  return out
}

async function makeBlob(dir) {
  const src = join(dir, 'src')
  const small = 2000
  const smallBytes = small * 8 * 1024
  const largeCount = 12
  const largeSize = Math.max(1, Math.floor((mib * 1024 * 1024 - smallBytes) / largeCount))
  for (let i = 0; i < largeCount; i++) {
    await mkdir(join(src, 'large'), { recursive: true })
    await writeFile(join(src, 'large', `f${i}`), textLike(largeSize, i + 1))
  }
  for (let i = 0; i < small; i++) {
    const d = join(src, 'small', String(i % 50))
    await mkdir(d, { recursive: true })
    await writeFile(join(d, `s${i}`), textLike(1024 + ((i * 7919) % 15360), 1000 + i))
  }
  const tar = join(dir, 'in.tar')
  execFileSync('tar', ['--format=pax', '--sort=name', '-C', src, '-cf', tar, '.'])
  const oracle = process.env.STRATA_ORACLE ?? join(repoRoot, '.tools/oracle/oracle')
  if (!existsSync(oracle)) throw new Error(`the oracle is not built at ${oracle}: run ./scripts/setup.sh`)
  const blob = join(dir, 'layer.esgz')
  execFileSync(oracle, ['build', tar, blob, ...(args.includes('--zstd') ? ['--zstdchunked'] : ['--gzip-level', '6'])])
  return blob
}

async function timed(f) {
  const t0 = process.hrtime.bigint()
  const result = await f()
  return { result, seconds: Number(process.hrtime.bigint() - t0) / 1e9 }
}

const dir = await mkdtemp(join(tmpdir(), 'strata-bench-read-'))
try {
  const path = given ?? (await makeBlob(dir))
  const blob = await fileReader(path)
  const layer = await openLayer(blob)
  const files = [...layer.toc.entries.values()].filter((e) => e.type === 'reg')
  const chunks = files.flatMap((e) => e.chunks)
  const bytes = chunks.reduce((n, c) => n + c.size, 0)
  const mb = bytes / 1e6
  console.log(`node ${process.version}, ${availableParallelism()} cores (shared)`)
  console.log(
    `blob: ${path}: ${layer.format}, ${(blob.size / 1e6).toFixed(1)} MB compressed, ${mb.toFixed(1)} MB in ${files.length} files, ${chunks.length} chunks`
  )

  // zstd:chunked: the TOC's skippable frame header (8 bytes) sits before tocOffset and is not payload.
  const payloadEnd = layer.format === 'zstd:chunked' ? layer.tocOffset - 8 : layer.tocOffset
  const measures = {
    // Baseline: the whole compressed payload through one decompressor stream, hashing what comes out.
    [`baseline: one ${layer.compression} stream + sha256 of the payload`]: async () => {
      const hash = createHash('sha256')
      await pipeline(
        createReadStream(path, { start: 0, end: payloadEnd - 1 }),
        layer.compression === 'zstd' ? createZstdDecompress() : createGunzip(),
        async (src) => {
          for await (const piece of src) hash.update(piece)
        }
      )
    },
    'readChunk (read + inflate + verify), 1 at a time': () => readAll(1),
    'readChunk (read + inflate + verify), 4 at a time': () => readAll(4),
    'verifyLayer (chunk + file digests, 4 read ahead)': () => verifyLayer(blob, layer)
  }
  async function readAll(concurrency) {
    let next = 0
    const worker = async () => {
      while (next < chunks.length) await readChunk(blob, layer, chunks[next++])
    }
    await Promise.all(Array.from({ length: concurrency }, worker))
  }
  // Interleaved rounds, best of each: the machine is shared, so the fastest round is the least disturbed.
  const best = {}
  for (let round = 0; round < rounds; round++) {
    for (const [name, f] of Object.entries(measures)) {
      const { seconds } = await timed(f)
      best[name] = Math.min(best[name] ?? Number.POSITIVE_INFINITY, seconds)
    }
  }
  const [baseName, ...rest] = Object.keys(measures)
  console.log(`best of ${rounds} rounds; MB/s of file content (${mb.toFixed(1)} MB)`)
  console.log(`${baseName}: ${(mb / best[baseName]).toFixed(0)} MB/s`)
  for (const name of rest) {
    const rate = mb / best[name]
    console.log(
      `${name}: ${rate.toFixed(0)} MB/s, ${(chunks.length / best[name]).toFixed(0)} chunks/s, ${(best[baseName] / best[name]).toFixed(2)}x baseline`
    )
  }
  await blob.close()
} finally {
  await rm(dir, { recursive: true, force: true })
}
