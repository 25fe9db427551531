import { randomBytes } from 'node:crypto'
import { mkdir, open, readdir, rm, symlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { oracle, run } from '@test/tools.js'

/** The program the mount tests run in a chroot, with the libraries `ldd` lists for it. */
export const PROGRAM = '/usr/bin/ls'

/**
 * Three layers of a small root file system, each a real directory, made a tar by GNU tar and eStargz by the
 * reference builder. Layer 0: a dynamically linked program and its libraries, a 20 MiB file, hardlinks,
 * a symlink, a fifo, a char device, setuid/sticky modes, an owner, xattrs. Layers 1 and 2: whiteouts,
 * opaque directories, a file replaced under its hardlink, new hardlinks and symlinks, one of them with mode
 * 0755 in its tar header (as some image builders write; Linux shows every symlink as 0777).
 */
export interface Fixture {
  /** The layer directories (whiteouts as `.wh.*` files), lowest first. */
  dirs: string[]
  /** eStargz blobs of the layers and their TOC digests. */
  blobs: { path: string; tocDigest: string }[]
  /** The merged root file system, extracted layer by layer with whiteouts applied. */
  reference: string
}

export async function makeFixture(work: string): Promise<Fixture> {
  const dirs = [join(work, 'layer0'), join(work, 'layer1'), join(work, 'layer2')]
  await layer0(dirs[0]!)
  await layer1(dirs[1]!)
  await layer2(dirs[2]!)
  const blobs: Fixture['blobs'] = []
  const reference = join(work, 'reference')
  await mkdir(reference)
  for (const [i, dir] of dirs.entries()) {
    const tar = join(work, `layer${i}.tar`)
    await run('tar', ['--sort=name', '--numeric-owner', '--xattrs', '--xattrs-include=*', '-C', dir, '-cf', tar, '.'])
    if (i === 2) await setTarMode(tar, './data/sym755', 0o755)
    const path = join(work, `layer${i}.blob`)
    const built = await oracle(['build', tar, path, '--chunk-size', String(1 << 20)])
    blobs.push({ path, tocDigest: built['toc-digest']! })
    await extractLayer(dir, tar, reference)
  }
  return { dirs, blobs, reference }
}

/** What an OCI runtime does with one layer: apply its whiteouts to what is there, extract it, drop the markers. */
async function extractLayer(dir: string, tar: string, root: string): Promise<void> {
  const markers: string[] = []
  const walk = async (rel: string): Promise<void> => {
    for (const d of await readdir(join(dir, rel), { withFileTypes: true })) {
      const path = rel === '' ? d.name : `${rel}/${d.name}`
      if (d.name === '.wh..wh..opq') {
        for (const child of await readdir(join(root, rel)).catch(() => [])) {
          await rm(join(root, rel, child), { recursive: true, force: true })
        }
        markers.push(path)
      } else if (d.name.startsWith('.wh.')) {
        await rm(join(root, rel, d.name.slice(4)), { recursive: true, force: true })
        markers.push(path)
      } else if (d.isDirectory()) await walk(path)
    }
  }
  await walk('')
  await run('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '-xpf', tar, '-C', root])
  for (const m of markers) await rm(join(root, m))
}

async function layer0(dir: string): Promise<void> {
  await mkdir(dir)
  const { stdout } = await run('ldd', [PROGRAM])
  const libs = [...stdout.matchAll(/(\/\S+) \(0x/g)].map((m) => m[1]!)
  for (const path of [PROGRAM, ...libs]) await run('cp', ['-L', '--parents', path, dir])
  await symlink('usr/bin', join(dir, 'bin'))
  await mkdir(join(dir, 'etc'))
  await writeFile(join(dir, 'etc', 'hostname'), 'strata\n')
  await writeFile(join(dir, 'etc', 'motd'), 'welcome (layer 0)\n')
  const data = join(dir, 'data')
  await mkdir(join(data, 'opq', 'sub'), { recursive: true })
  await mkdir(join(data, 'gone'))
  await writeFile(join(data, 'opq', 'old1'), 'old1\n')
  await writeFile(join(data, 'opq', 'sub', 'old2'), 'old2\n')
  await writeFile(join(data, 'gone', 'x'), 'x\n')
  await writeFile(join(data, 'big'), randomBytes(20 * 1024 * 1024))
  await writeFile(join(data, 'a'), 'alpha\n')
  await run('ln', [join(data, 'a'), join(data, 'a-link')])
  await writeFile(join(data, 'empty'), '')
  await writeFile(join(data, 'suid'), '#!/bin/sh\n')
  await run('chmod', ['4755', join(data, 'suid')])
  await writeFile(join(data, 'owned'), 'mine\n')
  await run('chown', ['1000:1001', join(data, 'owned')])
  await writeFile(join(data, 'attrs'), 'with xattrs\n')
  await run('setfattr', ['-n', 'user.strata', '-v', 'hello', join(data, 'attrs')])
  await run('setfattr', ['-n', 'user.other', '-v', '0x00ff10', join(data, 'attrs')])
  await run('mkfifo', [join(data, 'fifo')])
  await mkdir(join(dir, 'dev'))
  await run('mknod', [join(dir, 'dev', 'zero'), 'c', '1', '5'])
  await mkdir(join(dir, 'tmp'))
  await run('chmod', ['1777', join(dir, 'tmp')])
  const docs = join(dir, 'usr', 'share', 'doc')
  await mkdir(docs, { recursive: true })
  for (let i = 0; i < 40; i++) await writeFile(join(docs, `doc${i}`), `document ${i}\n`.repeat(1 + i * 300))
}

async function layer1(dir: string): Promise<void> {
  const data = join(dir, 'data')
  await mkdir(join(data, 'opq'), { recursive: true })
  await mkdir(join(dir, 'etc'))
  await writeFile(join(dir, 'etc', '.wh.hostname'), '')
  await writeFile(join(dir, 'etc', 'motd'), 'welcome (layer 1)\n')
  await run('chmod', ['0600', join(dir, 'etc', 'motd')])
  await writeFile(join(data, '.wh.gone'), '')
  await writeFile(join(data, 'opq', '.wh..wh..opq'), '')
  await writeFile(join(data, 'opq', 'new1'), 'new1\n')
  await writeFile(join(data, 'opq', 'new2'), 'new2\n')
  // Replaces data/a; data/a-link keeps the old content.
  await writeFile(join(data, 'a'), 'alpha, replaced\n')
  await writeFile(join(data, 'n1'), 'n1\n')
  await run('ln', [join(data, 'n1'), join(data, 'n1-link')])
}

async function layer2(dir: string): Promise<void> {
  const data = join(dir, 'data')
  await mkdir(join(data, 'opq'), { recursive: true })
  await writeFile(join(data, 'opq', '.wh.new1'), '')
  await symlink('../etc/motd', join(data, 'sym'))
  await symlink('sym', join(data, 'sym755'))
  await mkdir(join(data, 'private'))
  await run('chmod', ['0700', join(data, 'private')])
  await run('chown', ['1000:1000', join(data, 'private')])
  await writeFile(join(data, 'private', 'secret'), 'secret\n')
}

/**
 * Rewrites the mode of one member in a tar's header (GNU tar takes a symlink's mode from lstat, always 0777 on
 * Linux; other builders write what they like), with the header's checksum.
 */
async function setTarMode(tar: string, name: string, mode: number): Promise<void> {
  const file = await open(tar, 'r+')
  try {
    const header = Buffer.alloc(512)
    for (let at = 0; (await file.read(header, 0, 512, at)).bytesRead === 512; ) {
      if (header.every((b) => b === 0)) break
      const member = header.subarray(0, 100).toString('latin1').replace(/\0.*$/s, '')
      const size = Number.parseInt(header.subarray(124, 136).toString('latin1').replace(/\0.*$/s, '').trim() || '0', 8)
      if (member === name) {
        header.write(`${mode.toString(8).padStart(7, '0')}\0`, 100, 'latin1')
        header.fill(0x20, 148, 156)
        const sum = header.reduce((a, b) => a + b, 0)
        header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1')
        await file.write(header, 0, 512, at)
        return
      }
      at += 512 + Math.ceil(size / 512) * 512
    }
    throw new Error(`${name} is not in ${tar}`)
  } finally {
    await file.close()
  }
}

/**
 * A tree as `find` sees it, one line per path: type, mode (with setuid/setgid/sticky), owner, links, size,
 * symlink target, mtime of files (to the second: eStargz keeps no more, and the reference builder rounds), and the sha256 of every regular file. Run as a child process, so it
 * never blocks the process that serves a FUSE mount.
 */
export async function describeTree(root: string): Promise<string[]> {
  // `cd` inside the shell, never `cwd`: spawning waits for the child's exec, and a child's chdir into the
  // mount needs this very process to answer.
  const inRoot = async (script: string) => (await run('sh', ['-c', `cd "$1" && ${script}`, 'sh', root])).stdout
  const stdout = await inRoot("find . -mindepth 1 -printf '%P|%y|%m|%U:%G|%n|%s|%l|%T@\\n'")
  const sums = await inRoot('find . -type f -print0 | xargs -0 -r sha256sum')
  const hashes = new Map(
    sums
      .trim()
      .split('\n')
      .map((l) => [l.slice(68), l.slice(0, 64)] as const)
  )
  return stdout
    .trim()
    .split('\n')
    .map((line) => {
      const [path, type, mode, owner, links, size, target, mtime] = line.split('|')
      const fields = [path, type, mode, owner, links]
      if (type === 'f') fields.push(size, String(Math.round(Number(mtime))), hashes.get(path!))
      if (type === 'l') fields.push(target)
      return fields.join(' ')
    })
    .sort()
}
