import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { chmod, chown, lstat, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { isMounted } from '@strata/fs'
import { type ControlServer, createControlClient, createNode, type StrataNode, startControlServer } from '@strata/node'
import { createRegistryClient } from '@strata/registry'
import { createMemoryStore } from '@strata/store'
import { buildTestImage, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { repoRoot, run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { addMountRoutes } from '../../packages/cli/src/mount-routes.js'

// What a local user gets from strata's mounts and from p2pd's control API, which acts as root: no more than
// the user has. An image with a setuid-root `id` and a 0666 character device; an unprivileged user (65534).

const BIN = join(repoRoot, 'packages', 'cli', 'bin', 'p2p-mount.js')
const NOBODY = 65534
const execp = promisify(execFile)

let work: string
let registry: TestRegistry
let image: TestImage
let node: StrataNode
let control: ControlServer
let socket: string
let dataDir: string
const running = new Set<ChildProcess>()

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-callers-'))
  await chmod(work, 0o755)
  await run('pnpm', ['exec', 'tsc', '-b', 'packages/cli'], { cwd: repoRoot })
  registry = await startRegistry()
  const files = join(work, 'image')
  await mkdir(join(files, 'bin'), { recursive: true })
  await mkdir(join(files, 'dev'), { recursive: true })
  await run('cp', ['/usr/bin/id', join(files, 'bin', 'id')])
  await chmod(join(files, 'bin', 'id'), 0o4755)
  await run('mknod', ['-m', '0666', join(files, 'dev', 'zero'), 'c', '1', '5'])
  image = await buildTestImage({
    registry: registry.host,
    repository: 'callers/suid',
    estargz: true,
    layers: [{ files }]
  })

  dataDir = join(work, 'p2pd')
  socket = join(dataDir, 'p2pd.sock')
  node = await createNode({
    store: createMemoryStore(),
    dataDir,
    listen: ['/ip4/127.0.0.1/tcp/0'],
    registry: createRegistryClient({ insecure: [registry.host] })
  })
  control = await startControlServer(node, { socket })
  addMountRoutes(control, node, { dataDir, socket })
})

afterAll(async () => {
  for (const p of running) p.kill('SIGKILL')
  await control?.close()
  await node?.stop()
  await registry?.stop()
  if (work !== undefined) {
    for (const d of await readdir(work).catch(() => [])) {
      if (await isMounted(join(work, d))) await run('umount', ['-l', join(work, d)])
    }
    await rm(work, { recursive: true, force: true })
  }
})

async function newDir(name: string, owner = 0): Promise<string> {
  const dir = join(work, name)
  await mkdir(dir, { recursive: true })
  await chown(dir, owner, owner)
  return dir
}

/** Runs a command as the unprivileged user; its exit code and output, never a throw. */
async function asNobody(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const argv = [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', cmd, ...args]
  try {
    const r = await execp('setpriv', argv, { encoding: 'utf8' })
    return { code: 0, stdout: r.stdout, stderr: r.stderr }
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string }
    return { code: e.code ?? 1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' }
  }
}

/** Starts p2p-mount and waits for its `mounted` line (embedded unless `daemon`). */
async function startMount(args: string[], daemon: boolean): Promise<ChildProcess> {
  const sock = daemon ? socket : join(work, 'no-p2pd.sock')
  const proc = spawn(process.execPath, [BIN, ...args, '--socket', sock, '--insecure-registry', registry.host], {
    stdio: ['ignore', 'pipe', 'pipe']
  })
  running.add(proc)
  proc.on('exit', () => running.delete(proc))
  let out = ''
  let err = ''
  proc.stderr!.on('data', (d) => {
    err += d
  })
  await new Promise<void>((resolve, reject) => {
    proc.stdout!.on('data', (d) => {
      out += d
      if (/^mounted .* at .*$/m.test(out)) resolve()
    })
    proc.on('exit', (code) => reject(new Error(`p2p-mount exited ${code} before mounting: ${err}`)))
  })
  return proc
}

async function stop(proc: ChildProcess): Promise<void> {
  const exited = new Promise((resolve) => proc.once('exit', resolve))
  proc.kill('SIGINT')
  await exited
}

describe('--writable mounts are nosuid,nodev', () => {
  for (const daemon of [false, true]) {
    it(`gives no setuid and no device through the overlay (${daemon ? 'daemon' : 'embedded'} mode)`, async () => {
      const mnt = await newDir(`rw-${daemon}`)
      const proc = await startMount(
        [image.ref, mnt, '--writable', ...(daemon ? [] : ['--data-dir', join(work, 'embedded')])],
        daemon
      )
      try {
        expect((await stat(join(mnt, 'bin', 'id'))).mode & 0o4000).toBe(0o4000)
        const id = await asNobody(join(mnt, 'bin', 'id'), ['-u'])
        expect(id).toMatchObject({ code: 0, stdout: `${NOBODY}\n` })
        const device = await asNobody('head', ['-c', '4', join(mnt, 'dev', 'zero')])
        expect(device.code).not.toBe(0)
        expect(device.stderr).toMatch(/Permission denied/)
        const options = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').find((l) => l.includes(` ${mnt} `))
        expect(options).toMatch(/nosuid/)
        expect(options).toMatch(/nodev/)
      } finally {
        await stop(proc)
      }
    })
  }
})

describe('the control API acts with the caller rights', () => {
  const client = () => createControlClient(socket)
  const mount = (body: unknown) => client().stream('/mount', body, () => {})

  it('refuses mountpoints that are not empty, not normalised, or system directories', async () => {
    const full = await newDir('full')
    await writeFile(join(full, 'file'), 'x')
    const empty = await newDir('empty')
    const cases: Array<[string, RegExp]> = [
      [full, /not empty/],
      ['/usr/share/doc', /system directory/],
      ['/etc', /system directory/],
      ['/usr/bin', /system directory/],
      ['/tmp', /system directory/],
      [`${empty}/../empty`, /not absolute and normalised/],
      [`${work}//empty`, /not absolute and normalised/],
      [dataDir, /would cover .* which p2pd needs/],
      [work, /would cover .* which p2pd needs/]
    ]
    for (const [mountpoint, message] of cases) {
      await expect(mount({ image: image.ref, mountpoint }), mountpoint).rejects.toThrow(message)
      expect(await isMounted(mountpoint)).toBe(false)
    }
    const link = join(work, 'link-to-empty')
    await symlink(empty, link)
    await expect(mount({ image: image.ref, mountpoint: link })).rejects.toThrow(/symbolic link/)
  })

  it('answers quickly for /etc (p2pd used to deadlock on its own relay there)', async () => {
    const started = Date.now()
    await expect(mount({ image: image.ref, mountpoint: '/etc' })).rejects.toThrow(/system directory/)
    expect(Date.now() - started).toBeLessThan(10_000)
  })

  /** The control API as the unprivileged user: the node script prints the result or the error message. */
  async function mountAsNobody(body: unknown): Promise<string> {
    const script = `
      const req = require('node:http').request({ socketPath: ${JSON.stringify(socket)}, path: '/mount', method: 'POST',
        headers: { 'content-type': 'application/json' } }, (res) => {
        let text = ''
        res.on('data', (d) => { text += d; if (/"type":"mounted"|"error"/.test(text)) { console.log(text); process.exit(0) } })
        res.on('end', () => { console.log(text); process.exit(0) })
      })
      req.end(${JSON.stringify(JSON.stringify(body))})`
    const r = await asNobody(process.execPath, ['-e', script])
    return r.stdout + r.stderr
  }

  it('takes the caller from the socket: a user must own the mountpoint and the record directory', async () => {
    await chmod(socket, 0o666) // an operator would add the user to the socket's group instead
    try {
      const roots = await newDir('roots')
      expect(await mountAsNobody({ image: image.ref, mountpoint: roots })).toMatch(/belongs to uid 0, not to you/)
      expect(await isMounted(roots)).toBe(false)

      const own = await newDir('nobodys', NOBODY)
      const record = join(work, 'roots-record.txt') // `work` belongs to root
      expect(await mountAsNobody({ image: image.ref, mountpoint: own, record })).toMatch(
        /cannot record reads into .*: its directory belongs to uid 0/
      )
      expect(await isMounted(own)).toBe(false)
      await expect(stat(record)).rejects.toMatchObject({ code: 'ENOENT' })
    } finally {
      await chmod(socket, 0o660)
    }
  })

  it('writes a record through no link: a planted symlink is replaced, its target untouched', async () => {
    const mnt = await newDir('record-mnt')
    const target = join(work, 'precious')
    await writeFile(target, 'keep me\n')
    const record = join(work, 'record.txt')
    await symlink(target, record)
    // Where the recorder used to write first: a link there must not be followed either.
    await symlink(target, `${record}.${process.pid}.tmp`)
    const proc = await startMount([image.ref, mnt, '--record', record], true)
    await readFile(join(mnt, 'bin', 'id'))
    await stop(proc)
    expect(await readFile(target, 'utf8')).toBe('keep me\n')
    expect((await lstat(record)).isSymbolicLink()).toBe(false)
    expect(await readFile(record, 'utf8')).toBe('bin/id\n')
  })

  it('listens with mode 0660 from the start, leaving no staging behind', async () => {
    const info = await stat(socket)
    expect(info.mode & 0o777).toBe(0o660)
    expect((await readdir(dataDir)).filter((n) => n.startsWith('.p2pd.sock.'))).toEqual([])
  })
})
