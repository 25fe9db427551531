import { constants } from 'node:fs'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Entry } from '@strata/stargz'
import { describe, expect, it } from 'vitest'
import { buildTree, createOperations, createReadRecorder, type ReadFailure, type ReadFile } from '../src/index.js'
import { CHUNK, contentOf, makeToc, readBytes } from './toc.js'

const layers = [
  makeToc([
    { path: 'bin/tool', size: 100, mode: 0o4755 },
    { path: 'bin/alias', type: 'hardlink', linkName: 'bin/tool' },
    { path: 'etc/conf', size: 7, xattrs: { 'user.note': new TextEncoder().encode('hi') } },
    { path: 'tmp', type: 'dir', mode: 0o1777 },
    { path: 'dev/null', type: 'char', mode: 0o666, devMajor: 1, devMinor: 3 },
    { path: 'dev/big', type: 'block', devMajor: 259, devMinor: 300 },
    { path: 'run/pipe', type: 'fifo', mode: 0o600 },
    { path: 'lib', type: 'symlink', linkName: 'usr/lib' }
  ]),
  makeToc([{ path: 'etc/conf', size: 5, uid: 1000, gid: 100 }])
]

const content = (path: string, size: number) => contentOf({ path, size } as Entry)

const readContent: ReadFile = async (_layer, entry, offset, length) =>
  contentOf(entry).subarray(offset, offset + length)

function setUp(read: ReadFile = readContent) {
  const failures: ReadFailure[] = []
  const reads: string[] = []
  // bin/tool is executable: library prefetch would add reads of its header to the ones these tests count.
  const ops = createOperations(buildTree(layers), read, {
    onError: (f) => failures.push(f),
    onRead: (p) => reads.push(p),
    prefetchLibraries: false
  })
  return { ops, failures, reads }
}

const errno = (fn: () => unknown) => {
  try {
    fn()
  } catch (err) {
    return (err as { code: string }).code
  }
  return 'no error'
}

describe('operations', () => {
  it('reports type bits, permissions incl. setuid/sticky, owners, sizes and device numbers', () => {
    const { ops } = setUp()
    const tool = ops.getattr('/bin/tool')
    expect(tool.mode).toBe(constants.S_IFREG | 0o4755)
    expect(tool.size).toBe(100)
    expect(tool.nlink).toBe(2)
    expect(ops.getattr('/bin/alias').ino).toBe(tool.ino)
    expect(ops.getattr('/tmp').mode).toBe(constants.S_IFDIR | 0o1777)
    expect(ops.getattr('/dev/null')).toMatchObject({ mode: constants.S_IFCHR | 0o666, rdev: 0x103 })
    // glibc makedev(259, 300): minor's high bits go above the major
    expect(ops.getattr('/dev/big').rdev).toBe((259 << 8) | (300 & 0xff) | ((300 & ~0xff) << 12))
    expect(ops.getattr('/run/pipe').mode).toBe(constants.S_IFIFO | 0o600)
    // A symlink is 0777 whatever its TOC entry says, as Linux shows every symlink.
    expect(ops.getattr('/lib')).toMatchObject({ mode: constants.S_IFLNK | 0o777, size: 7 })
    expect(ops.getattr('/etc/conf')).toMatchObject({ uid: 1000, gid: 100, size: 5, mtimeMs: 1_700_000_000_000 })
    expect(ops.readlink('/lib')).toBe('usr/lib')
  })

  it('maps failures to errno', () => {
    const { ops } = setUp()
    expect(errno(() => ops.getattr('/nope'))).toBe('ENOENT')
    expect(errno(() => ops.getattr('/etc/conf/x'))).toBe('ENOTDIR')
    expect(errno(() => ops.readdir('/etc/conf'))).toBe('ENOTDIR')
    expect(errno(() => ops.readlink('/etc/conf'))).toBe('EINVAL')
    expect(errno(() => ops.open('/etc/conf', constants.O_WRONLY))).toBe('EROFS')
    expect(errno(() => ops.open('/etc/conf', constants.O_RDWR))).toBe('EROFS')
    expect(errno(() => ops.open('/etc/conf', constants.O_RDONLY | constants.O_TRUNC))).toBe('EROFS')
    expect(errno(() => ops.open('/etc/conf', constants.O_RDONLY))).toBe('no error')
    expect(errno(() => ops.open('/nope', constants.O_RDONLY))).toBe('ENOENT')
    expect(errno(() => ops.access('/etc/conf', constants.W_OK))).toBe('EROFS')
    expect(errno(() => ops.access('/etc/conf', constants.R_OK))).toBe('no error')
    expect(errno(() => ops.modify('/etc/conf'))).toBe('EROFS')
    expect(errno(() => ops.getxattr('/etc/conf', 'user.other'))).toBe('ENODATA')
  })

  it('reads xattrs of the topmost layer that has the path', () => {
    const { ops } = setUp()
    expect(ops.listxattr('/etc/conf')).toEqual([]) // layer 1 replaced the file, without attributes
    const below = createOperations(buildTree(layers.slice(0, 1)), readContent)
    expect(below.listxattr('/etc/conf')).toEqual(['user.note'])
    expect(new TextDecoder().decode(below.getxattr('/etc/conf', 'user.note'))).toBe('hi')
  })

  it('lists directories sorted and counts statfs over distinct files', () => {
    const { ops } = setUp()
    expect(ops.readdir('/')).toEqual(['bin', 'dev', 'etc', 'lib', 'run', 'tmp'])
    expect(ops.readdir('/bin')).toEqual(['alias', 'tool'])
    const s = ops.statfs()
    expect(s).toMatchObject({ bsize: 4096, blocks: 1, bfree: 0, bavail: 0, namemax: 255 })
    expect(s.files).toBe(12) // root, 6 top-level dirs and links, tool (= alias), conf, null, big, pipe
  })

  it('reads whole chunks through the callback with the right layer and entry, clamped to the file size', async () => {
    const calls: [number, string, number, number][] = []
    const { ops, reads } = setUp(async (layer, entry: Entry, offset, length) => {
      calls.push([layer, entry.path, offset, length])
      return readContent(layer, entry, offset, length)
    })
    expect(new TextDecoder().decode(await readBytes(ops, '/etc/conf', 0, 4096))).toBe('etc/c')
    expect(await readBytes(ops, '/bin/alias', 90, 4096)).toEqual(content('bin/tool', 100).subarray(90))
    expect((await readBytes(ops, '/bin/tool', 100, 10)).length).toBe(0)
    // Across a chunk boundary: the second chunk comes from the buffer, the first is fetched.
    expect(await readBytes(ops, '/bin/tool', 30, 60)).toEqual(content('bin/tool', 100).subarray(30, 90))
    expect(calls).toEqual([
      [1, 'etc/conf', 0, 5],
      [0, 'bin/tool', 80, 20],
      [0, 'bin/tool', 0, 40],
      [0, 'bin/tool', 40, 40]
    ])
    expect(reads).toEqual(['/etc/conf', '/bin/alias', '/bin/tool'])
    await expect(readBytes(ops, '/etc', 0, 1)).rejects.toMatchObject({ code: 'EISDIR' })
    await expect(readBytes(ops, '/dev/null', 0, 1)).rejects.toMatchObject({ code: 'EINVAL' })
  })

  it('fetches a chunk once for many small reads, and the next ones ahead of a sequential reader', async () => {
    const calls: number[] = []
    const read: ReadFile = async (layer, entry, offset, length) => {
      calls.push(offset)
      return readContent(layer, entry, offset, length)
    }
    const ops = createOperations(buildTree(layers), read, { chunkBufferBytes: 3 * CHUNK, prefetchLibraries: false })
    const whole = new Uint8Array(100)
    for (let at = 0; at < 100; at += 8) whole.set(await readBytes(ops, '/bin/tool', at, 8), at)
    expect(whole).toEqual(content('bin/tool', 100))
    expect(calls).toEqual([0, 40, 80])
  })

  it('shares a chunk read in flight and evicts the least recently used chunk', async () => {
    const calls: number[] = []
    const read: ReadFile = async (layer, entry, offset, length) => {
      calls.push(offset)
      return readContent(layer, entry, offset, length)
    }
    const ops = createOperations(buildTree(layers), read, { chunkBufferBytes: CHUNK, prefetchLibraries: false })
    await Promise.all([readBytes(ops, '/bin/tool', 0, 1), readBytes(ops, '/bin/tool', 1, 1)])
    expect(calls).toEqual([0])
    await readBytes(ops, '/bin/tool', 45, 1)
    await readBytes(ops, '/bin/tool', 2, 1)
    expect(calls).toEqual([0, 40, 0])
  })

  it('reads chunks in local storage straight into the caller buffer, and loads the others', async () => {
    const loads: number[] = []
    const read: ReadFile = async (layer, entry, offset, length) => {
      loads.push(offset)
      return readContent(layer, entry, offset, length)
    }
    // Chunks 0 and 2 of bin/tool are stored; chunk 1 is not.
    const stored = new Set([0, 80])
    const direct: number[] = []
    const ops = createOperations(buildTree(layers), read, {
      prefetchLibraries: false,
      readStored: async (_layer, entry, offset, into) => {
        const first = Math.floor(offset / CHUNK) * CHUNK
        for (let at = first; at < offset + into.length; at += CHUNK) if (!stored.has(at)) return undefined
        direct.push(offset)
        into.set(contentOf(entry).subarray(offset, offset + into.length))
        return into.length
      }
    })
    const whole = content('bin/tool', 100)
    expect(await readBytes(ops, '/bin/tool', 5, 10)).toEqual(whole.subarray(5, 15))
    expect(await readBytes(ops, '/bin/tool', 85, 100)).toEqual(whole.subarray(85))
    expect(loads).toEqual([])
    // Chunk 1 is loaded whole and kept; the next read of it comes from memory, not storage.
    expect(await readBytes(ops, '/bin/tool', 35, 10)).toEqual(whole.subarray(35, 45))
    expect(loads).toContain(40)
    stored.add(40)
    const before = direct.length
    expect(await readBytes(ops, '/bin/tool', 50, 5)).toEqual(whole.subarray(50, 55))
    expect(direct.length).toBe(before)
    expect(direct).toEqual([5, 85])
  })

  it('with local storage, holds in memory only chunks being read: none ahead, none read to their end, none once idle', async () => {
    const loads: number[] = []
    const read: ReadFile = async (layer, entry, offset, length) => {
      loads.push(offset)
      return readContent(layer, entry, offset, length)
    }
    // Nothing is stored at first: every chunk is loaded; once loaded, it is stored (as the fetcher does).
    const stored = new Set<number>()
    const ops = createOperations(
      buildTree(layers),
      async (layer, entry, offset, length) => {
        const bytes = await read(layer, entry, offset, length)
        stored.add(offset)
        return bytes
      },
      {
        prefetchLibraries: false,
        chunkBufferIdleMs: 50,
        readStored: async (_layer, entry, offset, into) => {
          const first = Math.floor(offset / CHUNK) * CHUNK
          for (let at = first; at < offset + into.length; at += CHUNK) if (!stored.has(at)) return undefined
          into.set(contentOf(entry).subarray(offset, offset + into.length))
          return into.length
        }
      }
    )
    const whole = content('bin/tool', 100)
    // The second half of chunk 0: the next chunks are not loaded into memory (the fetcher reads ahead to the store).
    expect(await readBytes(ops, '/bin/tool', 0, 30)).toEqual(whole.subarray(0, 30))
    expect(loads).toEqual([0])
    // Chunk 0 is still held while it is read; read to its end it is let go, and comes from storage after.
    stored.clear()
    expect(await readBytes(ops, '/bin/tool', 30, 10)).toEqual(whole.subarray(30, 40))
    expect(loads).toEqual([0])
    expect(await readBytes(ops, '/bin/tool', 0, 10)).toEqual(whole.subarray(0, 10))
    expect(loads).toEqual([0, 0])
    // Idle for longer than chunkBufferIdleMs, the chunk buffer holds nothing.
    stored.clear()
    await new Promise((r) => setTimeout(r, 150))
    expect(await readBytes(ops, '/bin/tool', 10, 10)).toEqual(whole.subarray(10, 20))
    expect(loads).toEqual([0, 0, 0])
  })

  it('turns a failed fetch or verification into EIO and tells onError why', async () => {
    const { ops, failures } = setUp(async () => {
      throw Object.assign(new Error('chunk sha256:abc failed verification'), { name: 'ChunkVerificationError' })
    })
    await expect(readBytes(ops, '/bin/tool', 0, 10)).rejects.toMatchObject({ name: 'FsError', code: 'EIO', errno: 5 })
    expect(failures).toHaveLength(1)
    expect(failures[0]).toMatchObject({ path: '/bin/tool', layer: 0, offset: 0, length: 10 })
    expect(failures[0]!.error.name).toBe('ChunkVerificationError')
  })

  it('forgets a failed chunk read, so the next read tries again', async () => {
    let fail = true
    const { ops } = setUp(async (layer, entry, offset, length) => {
      if (fail) throw new Error('bad bytes from a peer')
      return readContent(layer, entry, offset, length)
    })
    await expect(readBytes(ops, '/etc/conf', 0, 5)).rejects.toMatchObject({ code: 'EIO' })
    fail = false
    expect(new TextDecoder().decode(await readBytes(ops, '/etc/conf', 0, 5))).toBe('etc/c')
  })
})

describe('read recorder', () => {
  it('writes the first read of each file, in order, one path per line', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'strata-fs-record-'))
    try {
      const file = join(dir, 'record.txt')
      const recorder = await createReadRecorder(file, { flushIntervalMs: 0 })
      for (const p of ['/bin/tool', '/etc/conf', '/bin/tool', 'lib/x']) recorder.record(p)
      await recorder.flush()
      expect(await readFile(file, 'utf8')).toBe('bin/tool\netc/conf\nlib/x\n')
      recorder.record('/z')
      await recorder.close()
      expect(await readFile(file, 'utf8')).toBe('bin/tool\netc/conf\nlib/x\nz\n')
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})
