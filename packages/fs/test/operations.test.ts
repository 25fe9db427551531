import { constants } from 'node:fs'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Entry } from '@strata/stargz'
import { describe, expect, it } from 'vitest'
import { buildTree, createOperations, createReadRecorder, type ReadFailure, type ReadRange } from '../src/index.js'
import { contentOf, makeToc, readBytes } from './toc.js'

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

const readContent: ReadRange = async (_layer, entry, offset, into) => {
  into.set(contentOf(entry).subarray(offset, offset + into.length))
  return into.length
}

function setUp(read: ReadRange = readContent) {
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

  it("reads through the layer's reader with the right layer and entry, clamped to the file size", async () => {
    // The chunks, their buffer and read-ahead are the reader's (the fetcher's readRange): fs passes reads through.
    const calls: [number, string, number, number][] = []
    const { ops, reads } = setUp(async (layer, entry: Entry, offset, into) => {
      calls.push([layer, entry.path, offset, into.length])
      return readContent(layer, entry, offset, into)
    })
    expect(new TextDecoder().decode(await readBytes(ops, '/etc/conf', 0, 4096))).toBe('etc/c')
    expect(await readBytes(ops, '/bin/alias', 90, 4096)).toEqual(content('bin/tool', 100).subarray(90))
    expect((await readBytes(ops, '/bin/tool', 100, 10)).length).toBe(0)
    expect(await readBytes(ops, '/bin/tool', 30, 60)).toEqual(content('bin/tool', 100).subarray(30, 90))
    expect(calls).toEqual([
      [1, 'etc/conf', 0, 5],
      [0, 'bin/tool', 90, 10],
      [0, 'bin/tool', 30, 60]
    ])
    expect(reads).toEqual(['/etc/conf', '/bin/alias', '/bin/tool'])
    await expect(readBytes(ops, '/etc', 0, 1)).rejects.toMatchObject({ code: 'EISDIR' })
    await expect(readBytes(ops, '/dev/null', 0, 1)).rejects.toMatchObject({ code: 'EINVAL' })
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

  it('keeps no failed read: the next read tries again', async () => {
    let fail = true
    const { ops } = setUp(async (layer, entry, offset, into) => {
      if (fail) throw new Error('bad bytes from a peer')
      return readContent(layer, entry, offset, into)
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
