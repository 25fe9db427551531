/** Real source trees, tars made from them by GNU tar, and eStargz blobs made by the reference (the oracle). */
import { createHash, randomBytes } from 'node:crypto'
import { chmod, chown, link, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { oracle, run } from '@test/tools.js'

export const CHUNK = 64 * 1024
/** Every file and directory gets this mtime (whole seconds: the TOC keeps seconds). */
export const MTIME = 1_700_000_000

/** Xattrs carried by the hand-written PAX entry appended to every tar (values may be binary). */
export const XATTR_PATH = 'xattr/file.txt'
export const XATTR_CONTENT = 'this file has extended attributes\n'
export const XATTRS: Record<string, Uint8Array> = {
  'user.note': new TextEncoder().encode('hello'),
  'user.bin': new Uint8Array([0, 1, 2, 0xfe, 0xff])
}

export const LONG_DIR = `deep/${'d'.repeat(60)}/${'e'.repeat(60)}`
export const LONG_NAME = `${LONG_DIR}/${'n'.repeat(150)}.txt`
export const UNICODE_NAME = 'unicode/héllo-wörld-世界-🙂.txt'

export interface SourceTree {
  /** Holds `src/` (the tree) and the tars and blobs made from it. */
  dir: string
  src: string
  /** The tar of `src` plus the xattr entry. */
  tar: string
  cleanup(): Promise<void>
}

/** Builds the source tree and its tar (GNU tar, PAX format, sorted). */
export async function makeSourceTree(): Promise<SourceTree> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-stargz-'))
  const src = join(dir, 'src')
  const w = async (p: string, data: string | Uint8Array, mode = 0o644) => {
    await mkdir(join(src, p, '..'), { recursive: true })
    await writeFile(join(src, p), data)
    await chmod(join(src, p), mode)
  }
  await mkdir(src)
  await w('etc/hostname', 'strata\n')
  await w('empty', '')
  await w('etc/empty-too', '')
  await w(LONG_NAME, 'a file whose path needs a PAX header\n')
  await w(UNICODE_NAME, 'unicode\n')
  for (const [name, size] of [
    ['sizes/chunk-minus-1', CHUNK - 1],
    ['sizes/chunk', CHUNK],
    ['sizes/chunk-plus-1', CHUNK + 1],
    ['sizes/three-chunks', 3 * CHUNK],
    ['sizes/random-200000', 200_000]
  ] as const) {
    await w(name, randomBytes(size))
  }
  await w('sizes/text-300000', 'the quick brown fox jumps over the lazy dog\n'.repeat(7000).slice(0, 300_000))
  await w('bin/setuid', '#!/bin/sh\n', 0o4755)
  await w('bin/setgid', '#!/bin/sh\n', 0o2755)
  await mkdir(join(src, 'tmp'))
  await chmod(join(src, 'tmp'), 0o1777)
  await w('owned', 'owned by someone else\n', 0o640)
  await chown(join(src, 'owned'), 1234, 5678)
  await link(join(src, 'etc/hostname'), join(src, 'etc/hostname-hardlink'))
  await link(join(src, 'sizes/three-chunks'), join(src, 'big-hardlink'))
  await symlink('hostname', join(src, 'etc/relative-symlink'))
  await symlink('/etc/passwd', join(src, 'absolute-symlink'))
  await symlink('does/not/exist', join(src, 'dangling-symlink'))
  await run('mkfifo', [join(src, 'fifo')])
  // Fixed mtimes (children first is not needed: utimes does not touch the parent).
  await run('find', [src, '-exec', 'touch', '-h', '-d', `@${MTIME}`, '{}', '+'])
  const tar = join(dir, 'in.tar')
  await run('tar', ['--format=pax', '--sort=name', '--numeric-owner', '-C', src, '-cf', tar, '.'])
  await appendXattrEntry(tar)
  return { dir, src, tar, cleanup: () => rm(dir, { recursive: true, force: true }) }
}

/** Replaces the tar's end-of-archive blocks with a PAX-headed file carrying SCHILY.xattr records, and a new end. */
async function appendXattrEntry(tarPath: string): Promise<void> {
  const tar = await readFile(tarPath)
  let end = tar.length
  while (end >= 512 && tar.subarray(end - 512, end).every((b) => b === 0)) end -= 512
  const records = Buffer.concat(
    Object.entries(XATTRS)
      .map(([k, v]) => paxRecord(`SCHILY.xattr.${k}`, v))
      .concat(paxRecord('path', `./${XATTR_PATH}`))
  )
  const content = Buffer.from(XATTR_CONTENT)
  const out = Buffer.concat([
    tar.subarray(0, end),
    tarHeader('./PaxHeaders/file.txt', records.length, 0x78),
    pad(records),
    tarHeader('./xattr-placeholder', content.length, 0x30),
    pad(content),
    Buffer.alloc(1024)
  ])
  await writeFile(tarPath, out)
}

function paxRecord(key: string, value: string | Uint8Array): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`), Buffer.from(value), Buffer.from('\n')])
  let len = body.length + 1
  while (String(len).length + body.length !== len) len = String(len).length + body.length
  return Buffer.concat([Buffer.from(String(len)), body])
}

function tarHeader(name: string, size: number, type: number): Buffer {
  const h = Buffer.alloc(512)
  h.write(name, 0)
  h.write('0000644\0', 100)
  h.write('0000000\0', 108)
  h.write('0000000\0', 116)
  h.write(`${size.toString(8).padStart(11, '0')}\0`, 124)
  h.write(`${MTIME.toString(8).padStart(11, '0')}\0`, 136)
  h[156] = type
  h.write('ustar\0', 257)
  h.write('00', 263)
  h.fill(0x20, 148, 156)
  let sum = 0
  for (const b of h) sum += b
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148)
  return h
}

function pad(b: Buffer): Buffer {
  return Buffer.concat([b, Buffer.alloc((512 - (b.length % 512)) % 512)])
}

export interface OracleBlob {
  path: string
  tocDigest: string
  tocOffset: number
  /** The oracle's whole output. */
  info: Record<string, string>
}

/** `oracle build` of the tar into `name` inside the tree's dir. */
export async function oracleBuild(tree: SourceTree, name: string, args: string[] = []): Promise<OracleBlob> {
  const path = join(tree.dir, name)
  const info = await oracle(['build', tree.tar, path, ...args])
  return {
    path,
    tocDigest: info['toc-digest']!,
    tocOffset: Number.parseInt(info['toc-offset']!, 10),
    info
  }
}

export function sha256(bytes: Uint8Array): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`
}
