import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type ChunkSource, createFetcher, type ImageLayer } from '@strata/fetcher'
import {
  buildTree,
  createOperations,
  isMounted,
  type Mount,
  mountFuse,
  type Operations,
  type ReadFailure,
  type ReadRange,
  serveMount
} from '@strata/fs'
import {
  type FileReadAt,
  fileReader,
  type Layer,
  openLayer,
  type ReadAt,
  readChunk,
  readFileRange
} from '@strata/stargz'
import { openDiskStore } from '@strata/store'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { describeTree, type Fixture, makeFixture, PROGRAM } from './fixture.js'

// Real FUSE mounts of layers built from real file trees, compared with a reference extraction.
// Everything that touches a mount runs as a child process: this process serves the mount.

let work: string
let fixture: Fixture
let readers: FileReadAt[]
let layers: Layer[]

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-fs-mount-'))
  fixture = await makeFixture(work)
  readers = await Promise.all(fixture.blobs.map((b) => fileReader(b.path)))
  layers = await Promise.all(readers.map((r, i) => openLayer(r, { tocDigest: fixture.blobs[i]!.tocDigest })))
})

afterAll(async () => {
  await Promise.all((readers ?? []).map((r) => r.close()))
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

async function mountLayers(
  name: string,
  blobs: ReadAt[] = readers,
  onError?: (f: ReadFailure) => void
): Promise<Mount & { dir: string }> {
  const dir = join(work, name)
  await mkdir(dir)
  const read: ReadRange = async (layer, entry, offset, into, options) => {
    const bytes = await readFileRange(blobs[layer]!, layers[layer]!, entry, offset, into.length, options)
    into.set(bytes)
    return bytes.length
  }
  const ops = createOperations(buildTree(layers), read, onError !== undefined ? { onError } : {})
  const mount = await mountFuse(ops, dir)
  return Object.assign(mount, { dir })
}

/** The fixture's layers as the fetcher serves them (digests of the blob files). */
function fetcherImage(): { layers: ImageLayer[] } {
  return {
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
}

/** Runs a command to its end without blocking this process (which serves the mount). */
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

describe('FUSE mount of an image', () => {
  let mount: Mount & { dir: string }
  beforeAll(async () => {
    mount = await mountLayers('mnt')
  })
  afterAll(async () => {
    await mount?.unmount()
  })

  it('shows exactly what a layer-by-layer extraction shows: paths, types, modes, owners, sizes, targets, sha256', async () => {
    const expected = await describeTree(fixture.reference)
    const actual = await describeTree(mount.dir)
    expect(actual).toEqual(expected)
    // The fixture really has what the comparison is about.
    expect(expected.find((l) => l.startsWith('data/a-link '))).toMatch(/ f 644 0:0 1 6 /)
    expect(expected.some((l) => l.startsWith('etc/hostname'))).toBe(false)
    expect(expected.filter((l) => l.startsWith('data/opq/'))).toHaveLength(1)
    expect(expected.find((l) => l.startsWith('data/suid '))).toMatch(/ f 4755 /)
    expect(expected.find((l) => l.startsWith('tmp '))).toMatch(/ d 1777 /)
    expect(expected.find((l) => l.startsWith('data/fifo '))).toMatch(/ p 644 /)
    expect(expected.find((l) => l.startsWith('dev/zero '))).toMatch(/ c 644 /)
    expect(expected.find((l) => l.startsWith('data/n1 '))).toMatch(/ f 644 0:0 2 /)
    // Its tar header says 0755; Linux shows 0777 for every symlink, as the extraction does.
    expect(expected.find((l) => l.startsWith('data/sym755 '))).toBe('data/sym755 l 777 0:0 1 sym')
    const header = await exec('tar', ['-tvf', join(work, 'layer2.tar'), './data/sym755'])
    expect(header.stdout).toMatch(/^lrwxr-xr-x /)
  })

  it('runs a dynamically linked program in a chroot', async () => {
    const r = await exec('chroot', [mount.dir, '/bin/ls', '-1', '/data/opq', '/etc'])
    expect(r.stderr).toBe('')
    expect(r.stdout).toBe('/data/opq:\nnew2\n\n/etc:\nmotd\n')
    expect(r.code).toBe(0)
    const version = await exec('chroot', [mount.dir, PROGRAM, '--version'])
    expect(version.stdout).toMatch(/GNU coreutils/)
  })

  it('keeps one inode for hardlinks, device numbers, xattrs and statfs', async () => {
    const r = await exec('stat', [
      '-c',
      '%i %h %t:%T %u:%g %a',
      ...['data/n1', 'data/n1-link', 'dev/zero', 'data/owned', 'data/private'].map((p) => join(mount.dir, p))
    ])
    const [n1, n1link, zero, owned, priv] = r.stdout.trim().split('\n')
    expect(n1!.split(' ')[0]).toBe(n1link!.split(' ')[0])
    expect(n1!.split(' ')[1]).toBe('2')
    expect(zero!.split(' ')[2]).toBe('1:5')
    expect(owned!.split(' ')[3]).toBe('1000:1001')
    expect(priv!.split(' ').slice(3)).toEqual(['1000:1000', '700'])
    const attrs = await exec('getfattr', ['-d', '-e', 'hex', '-m', '-', join(mount.dir, 'data', 'attrs')])
    expect(attrs.stdout).toContain('user.strata=0x68656c6c6f')
    expect(attrs.stdout).toContain('user.other=0x00ff10')
    const df = await exec('stat', ['-f', '-c', '%T %b %S', mount.dir])
    expect(df.stdout).toMatch(/^fuseblk|fuse/)
    expect(Number(df.stdout.trim().split(' ')[1]) * 4096).toBeGreaterThanOrEqual(20 * 1024 * 1024)
  })

  it('refuses a second mount on the same mountpoint, saying what to do', async () => {
    const ops = createOperations(buildTree(layers), async () => 0)
    await expect(mountFuse(ops, mount.dir)).rejects.toMatchObject({
      name: 'MountError',
      code: 'ERR_MOUNT',
      message: `cannot mount at ${mount.dir}: something is mounted there already`,
      hint: expect.stringContaining(`p2p-mount --unmount ${mount.dir}`)
    })
  })

  it('refuses writes with EROFS', async () => {
    const r = await exec('sh', ['-c', `echo x > ${join(mount.dir, 'etc', 'motd')}`])
    expect(r.code).not.toBe(0)
    expect(r.stderr).toMatch(/Read-only file system/)
    const mk = await exec('mkdir', [join(mount.dir, 'newdir')])
    expect(mk.stderr).toMatch(/Read-only file system/)
  })

  it('serves concurrent readers the same bytes', async () => {
    const files = ['data/big', ...Array.from({ length: 40 }, (_, i) => `usr/share/doc/doc${i}`)]
    const expected = await exec('sh', ['-c', `cd ${fixture.reference} && sha256sum ${files.join(' ')}`])
    const readers = Array.from({ length: 6 }, (_, i) =>
      exec('sh', [
        '-c',
        `cd ${mount.dir} && sha256sum ${[...files.slice(i), ...files.slice(0, i)].join(' ')} | sort -k2`
      ])
    )
    const sorted = expected.stdout
      .trim()
      .split('\n')
      .sort((a, b) => a.slice(66).localeCompare(b.slice(66)))
      .join('\n')
    for (const r of await Promise.all(readers)) {
      expect(r.stderr).toBe('')
      expect(
        r.stdout
          .trim()
          .split('\n')
          .sort((a, b) => a.slice(66).localeCompare(b.slice(66)))
          .join('\n')
      ).toBe(sorted)
    }
  })
})

describe('reads through the kernel', () => {
  it('asks for 1 MiB at a time from a sequential reader (libfuse 2 asked for 128 KiB)', async () => {
    const dir = join(work, 'sizes')
    await mkdir(dir)
    const read: ReadRange = async (layer, entry, offset, into, options) => {
      const bytes = await readFileRange(readers[layer]!, layers[layer]!, entry, offset, into.length, options)
      into.set(bytes)
      return bytes.length
    }
    const ops = createOperations(buildTree(layers), read)
    const sizes: number[] = []
    const counted: Operations = Object.create(ops)
    counted.read = (path, offset, into, options) => {
      if (path === '/data/big') sizes.push(into.length)
      return ops.read(path, offset, into, options)
    }
    const mount = await mountFuse(counted, dir)
    try {
      const r = await exec('dd', [`if=${dir}/data/big`, 'of=/dev/null', 'bs=1M'])
      expect(r.code).toBe(0)
    } finally {
      await mount.unmount()
    }
    const total = sizes.reduce((a, b) => a + b, 0)
    expect(Math.max(...sizes)).toBe(1 << 20)
    expect(sizes.filter((n) => n === 1 << 20).length * (1 << 20)).toBeGreaterThan(total * 0.8)
  })
})

describe('when the FUSE relay dies', () => {
  it('readers get an error instead of waiting forever, and the unmount still cleans up', async () => {
    const mount = await mountLayers('relay')
    try {
      const before = await exec('cat', [join(mount.dir, 'etc', 'motd')])
      expect(before.code).toBe(0)
      // The relay is this process's `dd` child reading /dev/fuse (setpriv execs into it).
      const relays = (await exec('pgrep', ['-P', String(process.pid), '-x', 'dd'])).stdout.trim().split('\n')
      expect(relays).toHaveLength(1)
      process.kill(Number(relays[0]), 'SIGKILL')
      const after = await exec('timeout', ['10', 'cat', join(mount.dir, 'data', 'big')])
      expect(after.code).toBe(1)
      expect(after.stderr).toMatch(/Transport endpoint is not connected|Software caused connection abort/)
    } finally {
      await mount.unmount()
    }
    expect(await isMounted(mount.dir)).toBe(false)
  })
})

describe('a mount whose chunks are all in the store', () => {
  it('reads them in place: the same files, no chunk loaded whole, no source asked', async () => {
    const store = await openDiskStore(join(work, 'store'), { fsync: false })
    const dir = join(work, 'stored')
    await mkdir(dir)
    try {
      const image = fetcherImage()
      for (const [i, layer] of layers.entries())
        for (const entry of layer.toc.entries.values())
          for (const chunk of entry.chunks) await store.put(chunk.digest, await readChunk(readers[i]!, layer, chunk))
      let gets = 0
      const counted = Object.create(store) as typeof store
      counted.get = (digest, options) => {
        gets++
        return store.get(digest, options)
      }
      const fetcher = createFetcher({ store: counted, sources: [], readAheadBytes: 0 })
      const mount = await serveMount({ image, fetcher, mountpoint: dir })
      try {
        const reading = [describeTree(dir), describeTree(dir), exec('chroot', [dir, PROGRAM, '--version'])] as const
        const [a, b, version] = await Promise.all(reading)
        expect(a).toEqual(await describeTree(fixture.reference))
        expect(b).toEqual(a)
        expect(version.stdout).toMatch(/GNU coreutils/)
      } finally {
        await mount.unmount()
      }
      // Mounted again (as p2pd does for each p2p-mount of an image it holds), the image's merged tree is reused;
      // another image object gets its own.
      const again = await serveMount({ image, fetcher, mountpoint: dir })
      try {
        expect(again.tree).toBe(mount.tree)
        expect((await exec('chroot', [dir, PROGRAM, '--version'])).stdout).toMatch(/GNU coreutils/)
      } finally {
        await again.unmount()
      }
      const other = await serveMount({ image: { layers: image.layers }, fetcher, mountpoint: dir })
      await other.unmount()
      expect(other.tree).not.toBe(mount.tree)
      expect(other.tree.inodes).toBe(mount.tree.inodes)
      expect(gets).toBe(0)
      const m = fetcher.metrics().sources.store!
      expect(m.bytes).toBeGreaterThan(20 * 1024 * 1024)
      expect(m.misses).toBe(0)
    } finally {
      await store.close()
    }
  })
})

describe('a chunk file damaged in the store behind its back', () => {
  it('is never served: the mount reads that chunk again from a source, and the reader gets the right bytes', async () => {
    const storeDir = join(work, 'store-damaged')
    const dir = join(work, 'mnt-damaged')
    await mkdir(dir)
    const entry = layers[0]!.toc.lookup('data/big')!
    let store = await openDiskStore(storeDir, { fsync: false })
    for (const chunk of entry.chunks) await store.put(chunk.digest, await readChunk(readers[0]!, layers[0]!, chunk))
    await store.close()
    // One bit flipped in one chunk file while the store was closed (a disk error, another program).
    const damaged = entry.chunks[2]!
    const file = join(storeDir, 'chunks', damaged.digest.slice(7, 9), damaged.digest.slice(7))
    const bytes = await readFile(file)
    bytes[12_345]! ^= 0x04
    await writeFile(file, bytes)

    store = await openDiskStore(storeDir, { fsync: false })
    const image = fetcherImage()
    const asked: string[] = []
    // The blobs themselves, as the registry would serve them.
    const blobs: ChunkSource = {
      name: 'registry',
      get(chunk, options) {
        asked.push(chunk.digest)
        const i = image.layers.findIndex((l) => l.digest === chunk.layer.digest)
        return readChunk(readers[i]!, layers[i]!, chunk, options)
      }
    }
    const fetcher = createFetcher({ store, sources: [blobs], readAheadBytes: 0 })
    const mount = await serveMount({ image, fetcher, mountpoint: dir })
    try {
      const [got, want] = await Promise.all([
        exec('sha256sum', [join(dir, 'data', 'big')]),
        exec('sha256sum', [join(fixture.reference, 'data', 'big')])
      ])
      expect(got.code).toBe(0)
      expect(got.stdout.slice(0, 64)).toBe(want.stdout.slice(0, 64))
      expect(asked).toEqual([damaged.digest])
      expect(await store.stats()).toMatchObject({ corrupt: 1, chunks: entry.chunks.length })
    } finally {
      await mount.unmount()
      await store.close()
    }
  })
})

describe('a chunk that fails verification', () => {
  it('gives EIO with the reason reported, and the next read succeeds', async () => {
    // A blob source that corrupts the file's chunk (a bad peer, a flipped bit) for the first two reads: the
    // kernel retries a failed page read once by itself, so a reader sees EIO only when the retry fails too.
    const target = layers[1]!.toc.lookup('data/n1')!
    const chunk = target.chunks[0]!
    let corrupted = 0
    const flaky: ReadAt[] = readers.map((r, i) =>
      i !== 1
        ? r
        : {
            size: r.size,
            async readAt(offset, length, options) {
              const bytes = await r.readAt(offset, length, options)
              if (corrupted < 2 && offset <= chunk.offset && offset + length >= chunk.end) {
                corrupted++
                const copy = bytes.slice()
                copy[chunk.offset - offset + 12]! ^= 0xff
                return copy
              }
              return bytes
            }
          }
    )
    const failures: ReadFailure[] = []
    const mount = await mountLayers('mnt-flaky', flaky, (f) => failures.push(f))
    try {
      const first = await exec('cat', [join(mount.dir, 'data', 'n1')])
      expect(first.code).not.toBe(0)
      expect(first.stderr).toMatch(/Input\/output error/)
      expect(failures).toHaveLength(2)
      expect(failures[0]).toMatchObject({ path: '/data/n1', layer: 1 })
      expect(failures[0]!.error.message).toMatch(/chunk sha256:[0-9a-f]{64} of data\/n1/)
      const second = await exec('cat', [join(mount.dir, 'data', 'n1')])
      expect(second).toMatchObject({ code: 0, stdout: 'n1\n' })
    } finally {
      await mount.unmount()
    }
    expect(await isMounted(mount.dir)).toBe(false)
  })
})
