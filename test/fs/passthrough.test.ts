import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { mkdir, mkdtemp, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type ChunkSource, createFetcher, type Fetcher, type ImageLayer } from '@strata/fetcher'
import { fuseReadMode, type ServedMount, serveMount } from '@strata/fs'
import { type Entry, type FileReadAt, fileReader, type Layer, openLayer, readChunk } from '@strata/stargz'
import { openDiskStore } from '@strata/store'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { describeTree, type Fixture, makeFixture, PROGRAM } from './fixture.js'

// FUSE passthrough (Linux 6.9+): a file held whole in the store (one chunk, its chunk file in the disk store) is
// opened with FOPEN_PASSTHROUGH and the chunk file as its backing file, so the kernel reads it without asking.
// Everything that touches a mount runs as a child process: this process serves the mount.

let work: string
let fixture: Fixture
let readers: FileReadAt[]
let layers: Layer[]
let image: { layers: ImageLayer[] }

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-fs-passthrough-'))
  fixture = await makeFixture(work)
  readers = await Promise.all(fixture.blobs.map((b) => fileReader(b.path)))
  layers = await Promise.all(readers.map((r, i) => openLayer(r, { tocDigest: fixture.blobs[i]!.tocDigest })))
  image = {
    layers: layers.map((layer, i): ImageLayer => {
      const digest = `sha256:${createHash('sha256').update(readFileSync(fixture.blobs[i]!.path)).digest('hex')}`
      const mediaType = 'application/vnd.oci.image.layer.v1.tar+gzip'
      return {
        ...layer,
        descriptor: { mediaType, digest, size: layer.size },
        digest,
        ref: { digest, repository: 'localhost/fixture' },
        verified: true
      }
    })
  }
})

afterAll(async () => {
  await Promise.all((readers ?? []).map((r) => r.close()))
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

function exec(cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => {
      stdout += d
    })
    child.stderr.on('data', (d) => {
      stderr += d
    })
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

async function until(what: string, check: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

async function fillStore(dir: string) {
  const store = await openDiskStore(dir, { fsync: false })
  for (const [i, layer] of layers.entries())
    for (const entry of layer.toc.entries.values())
      for (const chunk of entry.chunks) await store.put(chunk.digest, await readChunk(readers[i]!, layer, chunk))
  return store
}

/**
 * Counts the reads that reached this process for files of one chunk that are not programs or libraries (whose
 * headers the mount itself reads ahead, in process: fs/libraries.ts).
 */
function counting(fetcher: Fetcher): { fetcher: Fetcher; singleChunkReads: () => number } {
  let n = 0
  const count = (entry: Entry) => {
    if (entry.chunks.length !== 1) return
    if (!isElf(entry)) n++
  }
  const counted = Object.create(fetcher) as Fetcher
  counted.readRange = (layer, entry, offset, into, options) => {
    count(entry)
    return fetcher.readRange(layer, entry, offset, into, options)
  }
  return { fetcher: counted, singleChunkReads: () => n }
}

/** A file of layer 0 held in one chunk, of some size (`elf` false: not a program or library). */
function singleChunkFile(elf?: boolean): Entry {
  for (const entry of layers[0]!.toc.entries.values()) {
    if (entry.type !== 'reg' || entry.chunks.length !== 1 || entry.size <= 4096) continue
    if (elf === false && (isElf(entry) || !existsSync(join(fixture.reference, entry.path)))) continue
    if (elf === undefined && !(entry.size > 64 * 1024 && entry.path.startsWith('usr/'))) continue
    return entry
  }
  throw new Error('no single-chunk file in the fixture')
}

function isElf(entry: Entry): boolean {
  const path = join(fixture.reference, entry.path)
  return existsSync(path) && readFileSync(path).subarray(0, 4).equals(Buffer.from('\x7fELF', 'latin1'))
}

const chunkFile = (storeDir: string, digest: string) => join(storeDir, 'chunks', digest.slice(7, 9), digest.slice(7))

/** Descriptors of this process open on the store's chunk files. */
async function chunkFds(storeDir: string): Promise<string[]> {
  const out: string[] = []
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '')
    if (target.startsWith(join(storeDir, 'chunks'))) out.push(target)
  }
  return out
}

const sha = (text: string) => text.trim().split(/\s+/)[0]

describe('FUSE passthrough of files held whole in the store', () => {
  it('reads the same bytes as without it, and the kernel reads them without asking', async () => {
    const storeDir = join(work, 'store-same')
    const store = await fillStore(storeDir)
    // The mount without passthrough reads through a store of its own, whose open chunk files are its own.
    const plainStore = await fillStore(join(work, 'store-same-plain'))
    const mounts: ServedMount[] = []
    try {
      const plain = counting(createFetcher({ store: plainStore, sources: [], readAheadBytes: 0 }))
      const passed = counting(createFetcher({ store, sources: [], readAheadBytes: 0 }))
      const a = join(work, 'mnt-off')
      const b = join(work, 'mnt-passthrough')
      await mkdir(a)
      await mkdir(b)
      mounts.push(await serveMount({ image, fetcher: plain.fetcher, mountpoint: a, fuse: { passthrough: false } }))
      mounts.push(await serveMount({ image, fetcher: passed.fetcher, mountpoint: b }))
      const [off, on] = mounts
      expect(off!.fuse?.().mode).toBe('off')
      const [withOut, withIt] = await Promise.all([describeTree(a), describeTree(b)])
      expect(withIt).toEqual(withOut)
      expect(withIt).toEqual(await describeTree(fixture.reference))
      // A program and its libraries run from it (exec and mmap go to the backing file too).
      expect((await exec('chroot', [b, PROGRAM, '--version'])).stdout).toMatch(/GNU coreutils/)
      expect(on!.fuse?.().mode).toBe('passthrough')
      // What p2pctl status says of this machine.
      expect(fuseReadMode()).toMatch(/^passthrough where the kernel offers it/)
      expect(plain.singleChunkReads()).toBeGreaterThan(0)
      expect(passed.singleChunkReads()).toBe(0)
      // Every file is closed: every backing file released, none of their descriptors left here (a file that is
      // not a program: the mount reads those ahead itself, and the store keeps the chunk files it reads open).
      await until('the backing files to be released', () => on!.fuse?.().backingFiles === 0)
      const entry = singleChunkFile(false)
      expect((await chunkFds(storeDir)).filter((p) => p.includes(entry.chunks[0]!.digest.slice(7)))).toEqual([])
    } finally {
      for (const m of mounts) await m.unmount()
      await store.close()
      await plainStore.close()
    }
  })

  it('never hands the kernel a chunk file damaged behind the store: EIO without a source, the right bytes with one', async () => {
    const storeDir = join(work, 'store-damaged')
    await (await fillStore(storeDir)).close()
    const entry = singleChunkFile()
    const file = chunkFile(storeDir, entry.chunks[0]!.digest)
    const bytes = await readFile(file)
    bytes[1000]! ^= 0x10
    await writeFile(file, bytes)
    const store = await openDiskStore(storeDir, { fsync: false })
    const mnt = join(work, 'mnt-damaged')
    await mkdir(mnt)
    try {
      const none = await serveMount({
        image,
        fetcher: createFetcher({ store, sources: [], readAheadBytes: 0 }),
        mountpoint: mnt
      })
      try {
        const got = await exec('cat', [join(mnt, entry.path)])
        expect(got.code).not.toBe(0)
        expect(got.stderr).toMatch(/Input\/output error/)
      } finally {
        await none.unmount()
      }
      expect((await store.stats()).corrupt).toBe(1)
      const registry: ChunkSource = {
        name: 'registry',
        get: (chunk, options) => readChunk(readers[0]!, layers[0]!, chunk, options)
      }
      const fetcher = createFetcher({ store, sources: [registry], readAheadBytes: 0 })
      const mount = await serveMount({ image, fetcher, mountpoint: mnt })
      try {
        const [got, want] = await Promise.all([
          exec('sha256sum', [join(mnt, entry.path)]),
          exec('sha256sum', [join(fixture.reference, entry.path)])
        ])
        expect(sha(got.stdout)).toBe(sha(want.stdout))
        // Fetched again, stored, and the next open passes through to the sound file.
        const again = await exec('sha256sum', [join(mnt, entry.path)])
        expect(sha(again.stdout)).toBe(sha(want.stdout))
      } finally {
        await mount.unmount()
      }
    } finally {
      await store.close()
    }
  })

  it('keeps a file open while its chunk is evicted readable, with the store counting it gone', async () => {
    const storeDir = join(work, 'store-evicted')
    const store = await fillStore(storeDir)
    const mnt = join(work, 'mnt-evicted')
    await mkdir(mnt)
    const entry = singleChunkFile()
    const digest = entry.chunks[0]!.digest
    const mount = await serveMount({
      image,
      fetcher: createFetcher({ store, sources: [], readAheadBytes: 0 }),
      mountpoint: mnt
    })
    try {
      const child = spawn(
        'sh',
        ['-c', 'exec 3< "$1" && echo open && read go && sha256sum <&3', 'sh', join(mnt, entry.path)],
        {
          stdio: ['pipe', 'pipe', 'pipe']
        }
      )
      let stdout = ''
      child.stdout.on('data', (d) => {
        stdout += d
      })
      const exited = new Promise<number | null>((resolve) => child.on('close', resolve))
      await until('the file to be open', () => stdout === 'open\n')
      expect(mount.fuse?.().backingFiles).toBe(1)
      const before = await store.stats()
      expect(await store.delete(digest)).toBe(true)
      const after = await store.stats()
      expect(after.chunks).toBe(before.chunks - 1)
      expect(after.bytes).toBe(before.bytes - entry.size)
      child.stdin.end('go\n')
      expect(await exited).toBe(0)
      const want = await exec('sha256sum', [join(fixture.reference, entry.path)])
      expect(sha(stdout.slice('open\n'.length))).toBe(sha(want.stdout))
      await until('the backing file to be released', () => mount.fuse?.().backingFiles === 0)
      expect((await chunkFds(storeDir)).filter((p) => p.includes(digest.slice(7)))).toEqual([])
      // Gone from the store now: a new open is a normal one, and with no source, EIO.
      const gone = await exec('cat', [join(mnt, entry.path)])
      expect(gone.code).not.toBe(0)
      expect((await store.stats()).chunks).toBe(after.chunks)
    } finally {
      await mount.unmount()
      await store.close()
    }
  })
})
