#!/usr/bin/env node
// FUSE sequential read throughput of a large file whose chunks are all in the local store (no network),
// against the same file read from local disk, each with a cold and a warm page cache.
//
//   pnpm exec tsc -b packages/fs packages/fetcher packages/store && node packages/fs/bench/read.mjs [--mib N]
//
// Runs as root (FUSE). The file (default 256 MiB of random bytes) is made an eStargz layer by the reference
// builder (default 4 MiB chunks), its chunks are put in a disk store, and the layer is mounted through the
// fetcher with no source but the store. Readers are `dd bs=1M` child processes (the kernel's read-ahead turns
// them into FUSE requests of up to 1 MiB). "Cold" drops the page cache of the file read (local) or of the
// store's chunk files (FUSE) with `dd iflag=nocache count=0`; each FUSE run uses a fresh mount, so the mount's
// page cache is empty. A last mount answers reads from memory without the fetcher: the ceiling of FUSE through
// Node here.
//
// With --holder every FUSE read is also made through p2pd's FUSE session holder (held.ts), both ways: direct
// (the holder keeps the descriptor, this process serves its own copy of it, as in process) and relay (the
// holder reads /dev/fuse and writes the replies, this process answers over its socket: the fallback), in
// rotating order with the in-process transport, and the figure is the median of each run's ratio to in-process. The layer then
// also has 10,000 small files in 100 directories, and each run times `ls -lR` of them on a fresh mount through
// each transport: metadata requests, whose cost is the round trip rather than the bytes.
//
// With --verify-cost it measures instead what hashing stored chunks on their first read costs (the disk store
// checks each chunk file against its digest once per process): per run, for the store reopened with the check
// (the default) and without it (`verifyReads: false`, the baseline), in alternating order, the first read after
// the reopen (every chunk hashed) and a read on a second fresh mount (steady state: nothing hashed), with the
// chunk files in the page cache ("cached") and dropped from it; the figure is the median of each run's ratio
// to the same run's baseline.
import { execFile } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { fileReader, openLayer, readChunk } from '@strata/stargz'
// Not dependencies of fs: the store and the fetcher are what production mounts read through.
import { createFetcher } from '../../fetcher/dist/index.js'
import { openDiskStore } from '../../store/dist/index.js'
import { createFuseHolder, serveMount } from '../dist/index.js'

const exec = promisify(execFile)
const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '../../..')
const args = process.argv.slice(2)
const mib = args.includes('--mib') ? Number(args[args.indexOf('--mib') + 1]) : 256
const RUNS = args.includes('--runs') ? Number(args[args.indexOf('--runs') + 1]) : 5
const verifyCost = args.includes('--verify-cost')
const viaHolder = args.includes('--holder')
const passthrough = args.includes('--passthrough')

const work = await mkdtemp(join(tmpdir(), 'strata-fs-bench-'))
const sh = async (script) => (await exec('sh', ['-c', script], { maxBuffer: 1 << 26 })).stdout

/** MiB/s of one `dd` read of `path` (its own timing, from its summary line). */
async function ddRead(path) {
  const { stderr } = await exec('dd', [`if=${path}`, 'of=/dev/null', 'bs=1M'])
  const m = /(\d+) bytes .* copied, ([\d.e-]+) s/.exec(stderr)
  if (m === null) throw new Error(`unexpected dd output: ${stderr}`)
  return Number(m[1]) / Number(m[2]) / 2 ** 20
}

const dropCache = (paths) => sh(`for f in ${paths.join(' ')}; do dd if="$f" iflag=nocache count=0 status=none; done`)

function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

try {
  const root = join(work, 'root')
  await mkdir(root)
  const file = join(root, 'big')
  await writeFile(file, randomBytes(mib * 2 ** 20))
  if (viaHolder) {
    for (let d = 0; d < 100; d++) {
      await mkdir(join(root, 'many', `d${d}`), { recursive: true })
      for (let f = 0; f < 100; f++) await writeFile(join(root, 'many', `d${d}`, `f${f}`), 'x')
    }
  }
  await exec('tar', ['--numeric-owner', '-C', root, '-cf', join(work, 'layer.tar'), '.'])
  const blobPath = join(work, 'layer.blob')
  // With --passthrough the file is one chunk: a file held whole in the store, which passthrough serves.
  const chunking = passthrough ? ['--chunk-size', String(mib * 2 ** 20)] : []
  await exec(join(repoRoot, '.tools/oracle/oracle'), [
    'build',
    join(work, 'layer.tar'),
    blobPath,
    '--gzip-level',
    '1',
    ...chunking
  ])
  const blobDigest = `sha256:${createHash('sha256')
    .update(await readFile(blobPath))
    .digest('hex')}`

  const blob = await fileReader(blobPath)
  const layer = await openLayer(blob)
  const storeDir = join(work, 'store')
  let store = await openDiskStore(storeDir)
  const entry = layer.toc.lookup('big')
  for (const chunk of entry.chunks)
    await store.put(chunk.digest, await readChunk(blob, layer, chunk), { layer: blobDigest })
  await blob.close()
  const imageLayer = {
    descriptor: { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: blobDigest, size: layer.size },
    digest: blobDigest,
    format: layer.format,
    toc: layer.toc,
    tocDigest: layer.tocDigest,
    verified: true,
    compression: layer.compression
  }
  const fetcher = createFetcher({ store, sources: [] })
  const chunkFiles = (await sh(`find ${storeDir}/chunks -type f`)).trim().split('\n')

  const results = {}
  const record = (name, value) => {
    results[name] ??= []
    results[name].push(value)
  }
  /** MiB/s of a `dd` of the big file through a fresh mount of the layer over `reader`. */
  const mountAndRead = async (name, reader, cold) => {
    const mnt = join(work, name)
    await mkdir(mnt)
    const mount = await serveMount({ image: { layers: [imageLayer] }, fetcher: reader, mountpoint: mnt })
    try {
      if (cold) await dropCache(chunkFiles)
      return await ddRead(join(mnt, 'big'))
    } finally {
      await mount.unmount()
    }
  }
  if (passthrough) {
    await benchPassthrough({ imageLayer, fetcher, file, chunkFiles, store })
    process.exit(0)
  }
  for (let run = 0; verifyCost && run < RUNS; run++) {
    for (const cold of [false, true]) {
      const cache = cold ? 'chunk files not in the page cache' : 'cached'
      for (const verifyReads of run % 2 === 0 ? [false, true] : [true, false]) {
        const mode = verifyReads ? 'verified' : 'baseline'
        await store.close()
        store = await openDiskStore(storeDir, { verifyReads })
        const reader = createFetcher({ store, sources: [] })
        const first = await mountAndRead(`mnt-${run}-${cold}-${mode}-1`, reader, cold)
        record(`${cache}, first read after the store's open, ${mode}`, first)
        const steady = await mountAndRead(`mnt-${run}-${cold}-${mode}-2`, reader, cold)
        record(`${cache}, later read (steady state), ${mode}`, steady)
        const hits = (await store.stats()).hits
        if (hits !== 2 * entry.chunks.length) throw new Error(`expected every chunk read twice, got ${hits} hits`)
      }
    }
  }
  // The holder's two ways: p2pd serving its own copy of the descriptor (direct, Linux 6.9+), and the relay (the
  // holder reads requests and writes replies; the fallback). Each with a holder process of its own.
  const holders = viaHolder
    ? [
        { via: ' (holder, direct)', holder: createFuseHolder(join(work, 'holder-direct')) },
        { via: ' (holder, relay)', holder: createFuseHolder(join(work, 'holder-relay'), { direct: false }) }
      ]
    : []
  /** Milliseconds of `ls -lR` of the small files, per run and transport. */
  const metadata = { '': [] }
  for (const h of holders) metadata[h.via] = []
  for (let run = 0; !verifyCost && run < RUNS; run++) {
    await dropCache([file])
    record('local disk, cold page cache', await ddRead(file))
    record('local disk, warm page cache', await ddRead(file))
    const all = [{ via: '', holder: undefined }, ...holders]
    // Each run starts with another transport, so none is always first after the local reads.
    const transports = all.map((_, i) => all[(i + run) % all.length])
    for (const { via, holder: through } of transports) {
      const how = through === undefined ? {} : { holder: through }
      const tag = via.replace(/\W+/g, '-')
      for (const cold of [true, false]) {
        const mnt = join(work, `mnt-${run}-${cold}${tag}`)
        await mkdir(mnt)
        const mount = await serveMount({ image: { layers: [imageLayer] }, fetcher, mountpoint: mnt, ...how })
        try {
          if (cold) await dropCache(chunkFiles)
          record(`FUSE${via}, store ${cold ? 'cold' : 'warm'}, first read`, await ddRead(join(mnt, 'big')))
          if (!cold) record(`FUSE${via}, second read (kernel page cache)`, await ddRead(join(mnt, 'big')))
        } finally {
          await mount.unmount()
        }
      }
      // The same mount with reads answered from memory: what FUSE through Node allows at most.
      const mnt = join(work, `mnt-${run}-memory${tag}`)
      await mkdir(mnt)
      const zeros = new Uint8Array(entry.chunks[0].size)
      const memory = {
        readRange: async (_layer, _entry, _offset, into) => {
          into.set(zeros.subarray(0, into.length))
          return into.length
        }
      }
      const mount = await serveMount({ image: { layers: [imageLayer] }, fetcher: memory, mountpoint: mnt, ...how })
      try {
        record(`FUSE${via}, reads answered from memory (the ceiling)`, await ddRead(join(mnt, 'big')))
      } finally {
        await mount.unmount()
      }
      if (holders.length === 0) continue
      const listed = join(work, `mnt-${run}-ls${tag}`)
      await mkdir(listed)
      const tree = await serveMount({ image: { layers: [imageLayer] }, fetcher, mountpoint: listed, ...how })
      try {
        const started = process.hrtime.bigint()
        const lines = Number(await sh(`ls -lR ${listed}/many | wc -l`))
        if (lines < 10_000) throw new Error(`ls -lR listed ${lines} lines`)
        metadata[via].push(Number(process.hrtime.bigint() - started) / 1e6)
      } finally {
        await tree.unmount()
      }
    }
  }
  await store.close()

  if (verifyCost) {
    console.log(
      `${mib} MiB file, ${entry.chunks.length} chunks of ${entry.chunks[0].size >> 20} MiB, ${RUNS} runs, MiB/s`
    )
    console.log('| read | baseline (no check) | verified | verified / baseline, median (runs) |')
    console.log('| --- | ---: | ---: | --- |')
    for (const name of Object.keys(results).filter((n) => n.endsWith(', baseline'))) {
      const what = name.slice(0, -', baseline'.length)
      const base = results[name]
      const checked = results[`${what}, verified`]
      const each = checked.map((v, i) => v / base[i])
      const runs = each.map((r) => r.toFixed(2)).join(', ')
      console.log(
        `| ${what} | ${median(base).toFixed(0)} | ${median(checked).toFixed(0)} | ${median(each).toFixed(2)} (${runs}) |`
      )
    }
  } else {
    console.log(
      `${mib} MiB file, ${entry.chunks.length} chunks of ${entry.chunks[0].size >> 20} MiB, median of ${RUNS} runs`
    )
    console.log('| read | MiB/s |\n| --- | ---: |')
    for (const [name, values] of Object.entries(results)) console.log(`| ${name} | ${median(values).toFixed(0)} |`)
    // The local cold read swings with the host's own cache (0.6-2.3 GB/s on this VM): each run's FUSE read is
    // compared with the local read of the same run, and the median of those ratios is the figure.
    const ratio = (a, b) => {
      const each = results[a].map((v, i) => v / results[b][i])
      return `${(median(each) * 100).toFixed(0)}% (runs: ${each.map((r) => `${(r * 100).toFixed(0)}%`).join(', ')})`
    }
    console.log(`\nFUSE / local, cold: ${ratio('FUSE, store cold, first read', 'local disk, cold page cache')}`)
    console.log(`FUSE / local, warm: ${ratio('FUSE, store warm, first read', 'local disk, warm page cache')}`)
    for (const { via } of holders) {
      for (const what of [
        'store cold, first read',
        'store warm, first read',
        'reads answered from memory (the ceiling)'
      ])
        console.log(`${via.trim()} / in-process, ${what}: ${ratio(`FUSE${via}, ${what}`, `FUSE, ${what}`)}`)
      const each = metadata[via].map((v, i) => v / metadata[''][i])
      console.log(
        `ls -lR of 10,000 files, fresh mount: in-process ${median(metadata['']).toFixed(0)} ms, ${via.trim()} ` +
          `${median(metadata[via]).toFixed(0)} ms; ratio ${median(each).toFixed(2)} ` +
          `(runs: ${each.map((r) => r.toFixed(2)).join(', ')})`
      )
    }
  }
} finally {
  await rm(work, { recursive: true, force: true })
}

/**
 * --passthrough: a file held whole in the store, read through a mount with FUSE passthrough (the kernel reads the
 * chunk file) and without it (every read a request to this process), against the local file: sequential reads
 * with the chunk file out of the page cache and in it, and random 4 KiB reads (a C reader: pread at random
 * aligned offsets for a second, the file's pages in the page cache, the mount's own cache empty at the start).
 */
async function benchPassthrough({ imageLayer, fetcher, file, chunkFiles, store }) {
  const reader = join(work, 'randread')
  await writeFile(
    `${reader}.c`,
    `#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int fd = open(argv[1], O_RDONLY);
  double seconds = atof(argv[2]);
  off_t size = lseek(fd, 0, SEEK_END);
  long pages = size / 4096, n = 0;
  char buf[4096];
  srandom(42);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (;;) {
    for (int i = 0; i < 256; i++, n++) {
      if (pread(fd, buf, 4096, (off_t)(random() % pages) * 4096) != 4096) { perror("pread"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double t = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    if (t >= seconds) { printf("%ld %f\\n", n, t); return 0; }
  }
}
`
  )
  await exec('cc', ['-O2', '-o', reader, `${reader}.c`])
  const RANDOM_SECONDS = 1
  const randRead = async (path) => {
    const [n, seconds] = (await exec(reader, [path, String(RANDOM_SECONDS)])).stdout.trim().split(' ').map(Number)
    return (n * 4096) / seconds / 2 ** 20
  }
  const results = {}
  const record = (name, value) => {
    results[name] ??= []
    results[name].push(value)
  }
  const modes = ['passthrough', 'off']
  for (let run = 0; run < RUNS; run++) {
    await dropCache([file])
    record('local disk, sequential, cold page cache', await ddRead(file))
    record('local disk, sequential, warm page cache', await ddRead(file))
    record('local disk, random 4 KiB, warm page cache', await randRead(file))
    for (const mode of run % 2 === 0 ? modes : [...modes].reverse()) {
      const fresh = async (what, read) => {
        const mnt = join(work, `mnt-${run}-${mode}-${what}`)
        await mkdir(mnt)
        const fuse = { passthrough: mode === 'passthrough' }
        const mount = await serveMount({ image: { layers: [imageLayer] }, fetcher, mountpoint: mnt, fuse })
        try {
          if (mount.fuse?.().mode === 'off' && mode === 'passthrough') throw new Error('passthrough is not on')
          return await read(join(mnt, 'big'))
        } finally {
          await mount.unmount()
        }
      }
      record(
        `FUSE ${mode}, sequential, store cold`,
        await fresh('cold', async (path) => {
          await dropCache(chunkFiles)
          return ddRead(path)
        })
      )
      record(`FUSE ${mode}, sequential, store warm`, await fresh('warm', ddRead))
      record(`FUSE ${mode}, random 4 KiB, store warm`, await fresh('random', randRead))
    }
  }
  await store.close()
  console.log(`${mib} MiB file in one chunk, median of ${RUNS} runs, random reads for ${RANDOM_SECONDS} s each`)
  console.log('| read | MiB/s |\n| --- | ---: |')
  for (const [name, values] of Object.entries(results)) console.log(`| ${name} | ${median(values).toFixed(0)} |`)
  const ratio = (a, b) => {
    const each = results[a].map((v, i) => v / results[b][i])
    return `${(median(each) * 100).toFixed(0)}% (runs: ${each.map((r) => `${(r * 100).toFixed(0)}%`).join(', ')})`
  }
  for (const mode of modes) {
    console.log(`\nFUSE ${mode} / local:`)
    console.log(
      `  sequential, cold: ${ratio(`FUSE ${mode}, sequential, store cold`, 'local disk, sequential, cold page cache')}`
    )
    console.log(
      `  sequential, warm: ${ratio(`FUSE ${mode}, sequential, store warm`, 'local disk, sequential, warm page cache')}`
    )
    console.log(
      `  random 4 KiB, warm: ${ratio(`FUSE ${mode}, random 4 KiB, store warm`, 'local disk, random 4 KiB, warm page cache')}`
    )
  }
  await rm(work, { recursive: true, force: true })
}
