import { constants } from 'node:fs'
import type { Entry } from '@strata/stargz'
import { describe, expect, it } from 'vitest'
import { buildTree, createOperations, type ReadRange } from '../src/index.js'
import { IN_HEADER, Op, OUT_HEADER, parseRequest, Session } from '../src/protocol.js'
import { contentOf, makeToc } from './toc.js'

// The FUSE protocol as the kernel speaks it: requests built byte by byte, replies decoded the same way.

const layers = [
  makeToc([
    { path: 'bin/tool', size: 100, mode: 0o755 },
    { path: 'bin/alias', type: 'hardlink', linkName: 'bin/tool' },
    { path: 'etc/conf', size: 30_000, xattrs: { 'user.note': new TextEncoder().encode('hi') } },
    { path: 'lib', type: 'symlink', linkName: 'usr/lib' },
    { path: 'old', size: 1, mtimeMs: -86_400_500 }
  ])
]

const readContent: ReadRange = async (_layer, entry, offset, into) => {
  into.set(contentOf(entry as Entry).subarray(offset, offset + into.length))
  return into.length
}

function setUp() {
  const ops = createOperations(buildTree(layers), readContent, { prefetchLibraries: false })
  const session = new Session(ops, { cacheTimeout: 3600, maxRead: 1 << 20 })
  let unique = 0n
  const request = (opcode: number, nodeid: number, body: Uint8Array = new Uint8Array()) => {
    const bytes = Buffer.alloc(IN_HEADER + body.length)
    bytes.writeUInt32LE(bytes.length, 0)
    bytes.writeUInt32LE(opcode, 4)
    bytes.writeBigUInt64LE(++unique, 8)
    bytes.writeBigUInt64LE(BigInt(nodeid), 16)
    bytes.set(body, IN_HEADER)
    return parseRequest(bytes)
  }
  /** The reply's errno (positive) and payload, after checking its header. */
  const ask = (opcode: number, nodeid: number, body?: Uint8Array) => {
    const req = request(opcode, nodeid, body)
    const reply = session.answer(req)
    if (reply === undefined) return undefined
    return decode(reply, req.unique)
  }
  return { ops, session, request, ask }
}

function decode(reply: Uint8Array, unique: bigint): { errno: number; data: Buffer } {
  const b = Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength)
  expect(b.readUInt32LE(0)).toBe(b.length)
  expect(b.readBigUInt64LE(8)).toBe(unique)
  return { errno: Math.abs(b.readInt32LE(4)), data: b.subarray(OUT_HEADER) }
}

const name = (s: string) => Buffer.from(`${s}\0`)
const u32s = (...xs: number[]) => Buffer.from(new Uint32Array(xs).buffer)

function init(minor = 40, flags = 0xffffffff) {
  return Buffer.concat([u32s(7, minor, 128 * 1024, flags), Buffer.alloc(48)])
}

/** LOOKUP's reply: the node id and the attributes of fuse_entry_out. */
function entryOut(data: Buffer) {
  return { nodeid: Number(data.readBigUInt64LE(0)), entryValid: Number(data.readBigUInt64LE(16)), attr: attr(data, 40) }
}

function attr(data: Buffer, at: number) {
  return {
    ino: Number(data.readBigUInt64LE(at)),
    size: Number(data.readBigUInt64LE(at + 8)),
    mtime: Number(data.readBigInt64LE(at + 32)),
    mtimensec: data.readUInt32LE(at + 52),
    mode: data.readUInt32LE(at + 60),
    nlink: data.readUInt32LE(at + 64)
  }
}

function readIn(fh: bigint, offset: number, size: number) {
  const b = Buffer.alloc(40)
  b.writeBigUInt64LE(fh, 0)
  b.writeBigUInt64LE(BigInt(offset), 8)
  b.writeUInt32LE(size, 16)
  return b
}

describe('FUSE protocol session', () => {
  it('agrees to 1 MiB reads in INIT, and refuses a kernel too old for that', () => {
    const { ask, session } = setUp()
    const reply = ask(Op.INIT, 0, init(40, (1 << 22) | 1 | (1 << 31)))!
    expect(reply.errno).toBe(0)
    expect(reply.data.readUInt32LE(0)).toBe(7)
    expect(reply.data.readUInt32LE(4)).toBe(40)
    // Only flags both sides know: ASYNC_READ and MAX_PAGES here, not bit 31.
    expect(reply.data.readUInt32LE(12)).toBe((1 << 22) | 1)
    expect(reply.data.readUInt16LE(28)).toBe(256) // max_pages
    expect(session.minor).toBe(40)
    // No INIT_EXT from the kernel: no flags2, so no passthrough.
    expect(reply.data.readUInt32LE(32)).toBe(0)
    expect(session.passthrough).toBe(false)

    const old = setUp()
    expect(old.ask(Op.INIT, 0, init(26))!.errno).toBe(71) // EPROTO
    expect(old.session.minor).toBe(0)
  })

  it('agrees to FUSE_PASSTHROUGH when asked and offered (flags2), with a stack depth that leaves room for an overlay', () => {
    const PASSTHROUGH = 1 << 5 // 1 << 37 of the 64-bit flags
    const offered = (body: Buffer) => {
      body.writeUInt32LE(0xffffffff, 16) // flags2: all
      return body
    }
    const ops = createOperations(buildTree(layers), readContent, { prefetchLibraries: false })
    for (const asked of [true, false]) {
      const session = new Session(ops, { cacheTimeout: 3600, maxRead: 1 << 20, passthrough: asked })
      const body = offered(init(44, 0xffffffff))
      const bytes = Buffer.alloc(IN_HEADER + body.length)
      bytes.writeUInt32LE(bytes.length, 0)
      bytes.writeUInt32LE(Op.INIT, 4)
      bytes.writeBigUInt64LE(1n, 8)
      bytes.set(body, IN_HEADER)
      const reply = Buffer.from(session.answer(parseRequest(bytes))!).subarray(16)
      expect(reply.readUInt32LE(4)).toBe(40)
      expect(reply.readUInt32LE(12) & (1 << 30)).toBe(1 << 30) // INIT_EXT
      expect(reply.readUInt32LE(32)).toBe(asked ? PASSTHROUGH : 0) // flags2
      expect(reply.readUInt32LE(36)).toBe(asked ? 1 : 0) // max_stack_depth
      expect(session.passthrough).toBe(asked)
      expect(session.resend).toBe(true) // FUSE_HAS_RESEND, 1 << 39
    }
  })

  it('answers an OPEN with passthrough: FOPEN_PASSTHROUGH and the backing id', () => {
    const { ask, session } = setUp()
    const bin = entryOut(ask(Op.LOOKUP, 1, name('bin'))!.data)
    const tool = entryOut(ask(Op.LOOKUP, bin.nodeid, name('tool'))!.data)
    const bytes = Buffer.alloc(IN_HEADER + 8)
    bytes.writeUInt32LE(bytes.length, 0)
    bytes.writeUInt32LE(Op.OPEN, 4)
    bytes.writeBigUInt64LE(99n, 8)
    bytes.writeBigUInt64LE(BigInt(tool.nodeid), 16)
    const reply = Buffer.from(session.openPassthrough(parseRequest(bytes), 7))
    expect(reply.readInt32LE(4)).toBe(0)
    expect(reply.readUInt32LE(16 + 8)).toBe(1 << 7) // FOPEN_PASSTHROUGH
    expect(reply.readInt32LE(16 + 12)).toBe(7)
    bytes.writeUInt32LE(1, IN_HEADER) // O_WRONLY
    expect(Buffer.from(session.openPassthrough(parseRequest(bytes), 7)).readInt32LE(4)).toBe(-30) // EROFS
  })

  it('looks up names: the inode as node id, attributes, and misses the kernel may remember', () => {
    const { ask } = setUp()
    const bin = entryOut(ask(Op.LOOKUP, 1, name('bin'))!.data)
    expect(bin.attr.mode).toBe(constants.S_IFDIR | 0o755)
    const tool = entryOut(ask(Op.LOOKUP, bin.nodeid, name('tool'))!.data)
    const alias = entryOut(ask(Op.LOOKUP, bin.nodeid, name('alias'))!.data)
    expect(tool.nodeid).toBe(tool.attr.ino)
    expect(alias.nodeid).toBe(tool.nodeid)
    expect(tool.attr).toMatchObject({ size: 100, nlink: 2, mode: constants.S_IFREG | 0o755 })
    expect(tool.entryValid).toBe(3600)

    const miss = ask(Op.LOOKUP, bin.nodeid, name('nope'))!
    expect(miss.errno).toBe(0)
    expect(entryOut(miss.data)).toMatchObject({ nodeid: 0, entryValid: 3600 })
    const conf = entryOut(ask(Op.LOOKUP, 1, name('etc'))!.data)
    const file = entryOut(ask(Op.LOOKUP, conf.nodeid, name('conf'))!.data)
    expect(ask(Op.LOOKUP, file.nodeid, name('x'))!.errno).toBe(20) // ENOTDIR
    // A node id never looked up: ESTALE, not a crash.
    expect(ask(Op.GETATTR, 9999, Buffer.alloc(16))!.errno).toBe(116)
  })

  it('keeps a time before 1970 (signed seconds, nanoseconds)', () => {
    const { ask } = setUp()
    const old = entryOut(ask(Op.LOOKUP, 1, name('old'))!.data)
    expect(old.attr.mtime).toBe(-86_401)
    expect(old.attr.mtimensec).toBe(500_000_000)
  })

  it('lists a directory in pieces that fit the size asked, each entry saying where the next starts', () => {
    const { ask } = setUp()
    const open = ask(Op.OPENDIR, 1, Buffer.alloc(8))!
    const fh = open.data.readBigUInt64LE(0)
    const names: string[] = []
    let offset = 0
    for (let i = 0; i < 20; i++) {
      const page = ask(Op.READDIR, 1, readIn(fh, offset, 64))!.data
      if (page.length === 0) break
      for (let at = 0; at < page.length; ) {
        const len = page.readUInt32LE(at + 16)
        names.push(page.subarray(at + 24, at + 24 + len).toString())
        offset = Number(page.readBigUInt64LE(at + 8))
        at += (24 + len + 7) & ~7
      }
    }
    expect(names).toEqual(['.', '..', 'bin', 'etc', 'lib', 'old'])
    ask(Op.RELEASEDIR, 1, readIn(fh, 0, 0))
    // A handle this session never gave out (the process that served the connection before did, and p2pd
    // restarted): the image has not changed, so the node's listing is the one that process had.
    const unknown = ask(Op.READDIR, 1, readIn(fh + 12345n, 0, 4096))!
    expect(unknown.errno).toBe(0)
    expect(unknown.data.length).toBeGreaterThan(0)
  })

  it('answers for node ids it never looked up, by inode number (a connection served again after a restart)', () => {
    const first = setUp()
    const looked = entryOut(first.ask(Op.LOOKUP, 1, name('old'))!.data)
    const { ask } = setUp()
    const reply = ask(Op.GETATTR, looked.nodeid, Buffer.alloc(16))!
    expect(reply.errno).toBe(0)
    expect(attr(reply.data, 16)).toEqual(looked.attr)
    expect(ask(Op.GETATTR, 999_999, Buffer.alloc(16))!.errno).toBe(116) // ESTALE: no such node
  })

  it('answers xattrs by size: 0 asks how large, too small is ERANGE', () => {
    const { ask } = setUp()
    const etc = entryOut(ask(Op.LOOKUP, 1, name('etc'))!.data)
    const conf = entryOut(ask(Op.LOOKUP, etc.nodeid, name('conf'))!.data).nodeid
    const get = (size: number, n: string) => ask(Op.GETXATTR, conf, Buffer.concat([u32s(size, 0), name(n)]))!
    expect(get(0, 'user.note').data.readUInt32LE(0)).toBe(2)
    expect(get(2, 'user.note').data.toString()).toBe('hi')
    expect(get(1, 'user.note').errno).toBe(34)
    expect(get(100, 'user.other').errno).toBe(61) // ENODATA
    expect(ask(Op.LISTXATTR, conf, u32s(0, 0))!.data.readUInt32LE(0)).toBe(10)
    expect(ask(Op.LISTXATTR, conf, u32s(10, 0))!.data.toString()).toBe('user.note\0')
  })

  it('reads into the buffer it is given, refuses changes, answers nothing to FORGET', async () => {
    const { ask, request, session } = setUp()
    const etc = entryOut(ask(Op.LOOKUP, 1, name('etc'))!.data)
    const conf = entryOut(ask(Op.LOOKUP, etc.nodeid, name('conf'))!.data).nodeid
    const lib = entryOut(ask(Op.LOOKUP, 1, name('lib'))!.data).nodeid
    expect(ask(Op.READLINK, lib)!.data.toString()).toBe('usr/lib')
    expect(ask(Op.OPEN, conf, u32s(constants.O_RDONLY, 0))!.errno).toBe(0)
    expect(ask(Op.OPEN, conf, u32s(constants.O_RDWR, 0))!.errno).toBe(30)

    const into = new Uint8Array(OUT_HEADER + (1 << 20))
    const req = request(Op.READ, conf, readIn(0n, 25_000, 1 << 20))
    const reply = decode(await session.read(req, into), req.unique)
    expect(reply.errno).toBe(0)
    expect(reply.data.length).toBe(5_000) // the file ends
    expect(reply.data.buffer).toBe(into.buffer)
    const expected = contentOf({ path: 'etc/conf', size: 30_000 } as Entry).subarray(25_000)
    expect(Buffer.compare(reply.data, expected)).toBe(0)

    for (const op of [Op.WRITE, Op.MKDIR, Op.UNLINK, Op.SETATTR, Op.CREATE, Op.SETXATTR]) {
      expect(ask(op, 1, Buffer.alloc(64))!.errno).toBe(30)
    }
    expect(ask(Op.FORGET, conf, Buffer.alloc(8))).toBeUndefined()
    expect(ask(Op.BATCH_FORGET, 1, Buffer.alloc(8))).toBeUndefined()
    expect(ask(4242, 1)!.errno).toBe(38) // ENOSYS
  })

  it('never throws on garbage, and refuses a request whose length lies', () => {
    const { session } = setUp()
    expect(() => parseRequest(new Uint8Array(10))).toThrow(/shorter than its header/)
    const lying = Buffer.alloc(IN_HEADER)
    lying.writeUInt32LE(999, 0)
    expect(() => parseRequest(lying)).toThrow(/says 999 bytes/)
    let seed = 7
    const random = () => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff
      return seed
    }
    for (let i = 0; i < 5000; i++) {
      const bytes = Buffer.alloc(IN_HEADER + (random() % 80))
      for (let j = 0; j < bytes.length; j++) bytes[j] = random() & 0xff
      bytes.writeUInt32LE(bytes.length, 0)
      bytes.writeUInt32LE(random() % 60, 4)
      bytes.writeBigUInt64LE(BigInt(random() % 8), 16)
      const req = parseRequest(bytes)
      if (req.opcode === Op.READ) continue
      const reply = session.answer(req)
      if (reply !== undefined) expect(Buffer.from(reply.buffer, reply.byteOffset, 4).readUInt32LE(0)).toBe(reply.length)
    }
  })
})
