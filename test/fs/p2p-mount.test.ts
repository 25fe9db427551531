import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { isMounted } from '@strata/fs'
import { type ControlServer, createControlClient, createNode, type StrataNode, startControlServer } from '@strata/node'
import { createRegistryClient } from '@strata/registry'
import { createMemoryStore } from '@strata/store'
import { buildTestImage, makeTestTree, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { repoRoot, run } from '@test/tools.js'
import { startWanProxy, type WanProxy } from '@test/wan-proxy.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
// p2pd's side of daemon mode, run in this process (p2pd.ts wires the same function).
import { addMountRoutes, type MountRoutes } from '../../packages/cli/src/mount-routes.js'

// The p2p-mount binary against a real registry: mount, read, record, SIGTERM mid-read, --unmount after
// a kill, --writable, a layer that is not eStargz.

const BIN = join(repoRoot, 'packages', 'cli', 'bin', 'p2p-mount.js')

let work: string
let registry: TestRegistry
let slow: WanProxy
let image: TestImage
let plain: TestImage
/** Its 6 MiB usr/bin/tool (bytes no other test image has) comes before the prefetch landmark. */
let prioritized: TestImage
const running = new Set<ChildProcess>()

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-p2p-mount-'))
  await run('pnpm', ['exec', 'tsc', '-b', 'packages/cli'], { cwd: repoRoot })
  registry = await startRegistry()
  const base = await makeTestTree(join(work, 'base'))
  const top = join(work, 'top')
  await mkdir(join(top, 'etc'), { recursive: true })
  await writeFile(join(top, 'etc', '.wh.conf0.txt'), '')
  await writeFile(join(top, 'etc', 'added.txt'), 'added in layer 1\n')
  image = await buildTestImage({
    registry: registry.host,
    repository: 'fs/app',
    estargz: true,
    layers: [{ files: base }, { files: top }]
  })
  plain = await buildTestImage({
    registry: registry.host,
    repository: 'fs/plain',
    estargz: false,
    layers: [{ files: top }]
  })
  prioritized = await buildTestImage({
    registry: registry.host,
    repository: 'fs/prioritized',
    estargz: true,
    layers: [
      {
        files: await makeTestTree(join(work, 'prioritized'), { seed: 2, bigBytes: 6 * 1024 * 1024 }),
        prioritized: ['usr/bin/tool']
      }
    ]
  })
  // 40 Mbit/s: reading the 9 MiB file takes about two seconds, long enough to signal mid-read.
  slow = await startWanProxy({ target: registry.host, rttMs: 10, bitsPerSecond: 40_000_000 })
})

afterAll(async () => {
  for (const p of running) p.kill('SIGKILL')
  await slow?.stop()
  await registry?.stop()
  if (work !== undefined) {
    for (const d of await readdir(work).catch(() => [])) {
      if (await isMounted(join(work, d))) await run('umount', ['-l', join(work, d)])
    }
    await rm(work, { recursive: true, force: true })
  }
})

interface Running {
  proc: ChildProcess
  stdout(): string
  stderr(): string
  exited: Promise<number | null>
}

/** Starts p2p-mount and waits for its `mounted IMAGE at MOUNTPOINT` line. Embedded mode: no p2pd answers. */
async function startMount(args: string[], socket = join(work, 'no-p2pd.sock')): Promise<Running> {
  const proc = spawn(process.execPath, [BIN, ...args, '--socket', socket], { stdio: ['ignore', 'pipe', 'pipe'] })
  running.add(proc)
  let out = ''
  let err = ''
  proc.stdout!.on('data', (d) => {
    out += d
  })
  proc.stderr!.on('data', (d) => {
    err += d
  })
  const exited = new Promise<number | null>((resolve) =>
    proc.on('exit', (code) => {
      running.delete(proc)
      resolve(code)
    })
  )
  const ready = new Promise<void>((resolve, reject) => {
    const check = () => {
      if (/^mounted .* at .*$/m.test(out)) resolve()
    }
    proc.stdout!.on('data', check)
    exited.then((code) => reject(new Error(`p2p-mount exited ${code} before mounting: ${err}`)))
    setTimeout(() => reject(new Error(`p2p-mount did not mount within 60 s: ${err}`)), 60_000).unref()
  })
  await ready
  return { proc, stdout: () => out, stderr: () => err, exited }
}

async function newDir(name: string): Promise<string> {
  const dir = join(work, name)
  await mkdir(dir, { recursive: true })
  return dir
}

const hex = (text: string) => text.trim().split(/\s+/)[0]

/**
 * Pushes two images in turn under one tag, mounting after each: the mount shows the second. Then the
 * registry goes away (a proxy in front of it stops): the mount still works, from what the tag named last,
 * and p2p-mount says so.
 */
async function movingTag(name: string, args: string[], socket?: string): Promise<void> {
  const door = await startWanProxy({ target: registry.host, rttMs: 0, bitsPerSecond: 1_000_000_000 })
  try {
    const push = async (text: string) => {
      const dir = await newDir(`${name}-tree-${text}`)
      await mkdir(join(dir, 'etc'), { recursive: true })
      await writeFile(join(dir, 'etc', 'version'), `${text}\n`)
      const layers = [{ files: dir }]
      return buildTestImage({ registry: registry.host, repository: `fs/${name}`, tag: 'latest', estargz: true, layers })
    }
    const ref = `${door.host}/fs/${name}:latest`
    const mountAndRead = async (n: number) => {
      const mnt = await newDir(`${name}-mnt-${n}`)
      const m = await startMount([ref, mnt, ...args], socket)
      const version = (await run('cat', [join(mnt, 'etc', 'version')])).stdout
      m.proc.kill('SIGINT')
      expect(await m.exited).toBe(0)
      return { version, stderr: m.stderr() }
    }
    await push('one')
    expect((await mountAndRead(1)).version).toBe('one\n')
    await push('two')
    const online = await mountAndRead(2)
    expect(online.version).toBe('two\n')
    expect(online.stderr).not.toContain('cannot be reached')
    await door.stop()
    const offline = await mountAndRead(3)
    expect(offline.version).toBe('two\n')
    expect(offline.stderr).toMatch(
      /the registry cannot be reached \(.+\): using sha256:[0-9a-f]{64}, what .+:latest named when it was last opened here/
    )
  } finally {
    await door.stop().catch(() => {})
  }
}

describe('p2p-mount', () => {
  it('mounts an image, serves its merged files, records what was read, and unmounts on SIGINT', async () => {
    const mnt = await newDir('mnt')
    const record = join(work, 'record.txt')
    const data = join(work, 'data')
    const m = await startMount([image.ref, mnt, '--data-dir', data, '--record', record])
    expect(m.stdout()).toBe(`mounted ${image.ref} at ${mnt}\n`)
    expect(await isMounted(mnt)).toBe(true)

    const tool = await run('sha256sum', [join(mnt, 'usr', 'bin', 'tool')])
    expect(hex(tool.stdout)).toBe(image.layers[0]!.files.get('usr/bin/tool'))
    expect((await run('cat', [join(mnt, 'etc', 'added.txt')])).stdout).toBe('added in layer 1\n')
    expect((await run('cat', [join(mnt, 'etc', 'conf3.txt')])).stdout).toMatch(/^seed 1 file 3\n/)
    const etc = (await run('ls', [join(mnt, 'etc')])).stdout.split('\n')
    expect(etc).not.toContain('conf0.txt')
    expect(etc).toContain('conf1.txt')
    expect((await run('readlink', [join(mnt, 'etc', 'tool-link')])).stdout).toBe('../usr/bin/tool\n')

    m.proc.kill('SIGINT')
    expect(await m.exited).toBe(0)
    expect(await isMounted(mnt)).toBe(false)
    expect((await readFile(record, 'utf8')).split('\n')).toEqual(['usr/bin/tool', 'etc/added.txt', 'etc/conf3.txt', ''])
  })

  it('unmounts cleanly on SIGTERM while reads are in flight', async () => {
    const mnt = await newDir('mnt-term')
    const ref = image.ref.replace(registry.host, slow.host)
    const m = await startMount([ref, mnt, '--data-dir', join(work, 'data-slow')])
    const readers = [0, 1, 2].map(
      () =>
        new Promise<number | null>((resolve) => {
          const p = spawn('sha256sum', [join(mnt, 'usr', 'bin', 'tool')], { stdio: 'ignore' })
          p.on('exit', resolve)
        })
    )
    await new Promise((r) => setTimeout(r, 700))
    expect(slow.bytesDown).toBeGreaterThan(0)
    m.proc.kill('SIGTERM')
    expect(await m.exited).toBe(0)
    expect(m.stderr()).toMatch(/unmounted /)
    expect(await isMounted(mnt)).toBe(false)
    // The readers end (with an error or the whole file); none hangs on a dead mount.
    await Promise.all(readers)
  })

  it('cleans up after a p2p-mount that was killed, with --unmount', async () => {
    const mnt = await newDir('mnt-kill')
    const data = join(work, 'data')
    const m = await startMount([image.ref, mnt, '--data-dir', data])
    m.proc.kill('SIGKILL')
    await m.exited
    expect(await isMounted(mnt)).toBe(true)
    const stale = await run('sh', ['-c', `ls ${mnt} 2>&1 || true`])
    expect(stale.stdout).toMatch(/Transport endpoint is not connected/)

    const r = await run(process.execPath, [BIN, '--unmount', mnt, '--data-dir', data])
    expect(r.stdout).toBe(`unmounted ${mnt}\n`)
    expect(await isMounted(mnt)).toBe(false)
    const again = await run(process.execPath, [BIN, '--unmount', mnt, '--data-dir', data])
    expect(again.stderr).toBe(`nothing is mounted at ${mnt}\n`)
  })

  it('mounts writable with an overlay whose changes stay under the data dir', async () => {
    const mnt = await newDir('mnt-rw')
    const data = join(work, 'data')
    const m = await startMount([image.ref, mnt, '--data-dir', data, '--writable'])
    await run('sh', ['-c', `echo changed > ${mnt}/etc/conf1.txt && mkdir ${mnt}/new && echo hi > ${mnt}/new/file`])
    expect((await run('cat', [join(mnt, 'etc', 'conf1.txt')])).stdout).toBe('changed\n')
    expect((await run('cat', [join(mnt, 'etc', 'conf2.txt')])).stdout).toMatch(/^seed 1 file 2\n/)
    m.proc.kill('SIGTERM')
    expect(await m.exited).toBe(0)
    expect(await isMounted(mnt)).toBe(false)
    const mounts = join(data, 'mounts')
    const [dir] = await readdir(mounts)
    expect(await readFile(join(mounts, dir!, 'upper', 'new', 'file'), 'utf8')).toBe('hi\n')
    expect(await isMounted(join(mounts, dir!, 'lower'))).toBe(false)
  })

  it('cleans up a writable mount (overlay and the FUSE mount under it) after a kill', async () => {
    const mnt = await newDir('mnt-rw-kill')
    const data = join(work, 'data-rw-kill')
    const m = await startMount([image.ref, mnt, '--data-dir', data, '--writable'])
    m.proc.kill('SIGKILL')
    await m.exited
    const [dir] = await readdir(join(data, 'mounts'))
    const lower = join(data, 'mounts', dir!, 'lower')
    expect(await isMounted(mnt)).toBe(true)
    expect(await isMounted(lower)).toBe(true)
    const r = await run(process.execPath, [BIN, '--unmount', mnt, '--data-dir', data])
    expect(r.stdout).toBe(`unmounted ${mnt}\n`)
    expect(await isMounted(mnt)).toBe(false)
    expect(await isMounted(lower)).toBe(false)
  })

  it('fetches a layer that is not eStargz whole, saying so', async () => {
    const mnt = await newDir('mnt-plain')
    const m = await startMount([plain.ref, mnt, '--data-dir', join(work, 'data')])
    expect(m.stderr()).toMatch(/layer 0 is not eStargz: fetching it whole \(\d+(\.\d)? (B|KiB)\)/)
    expect((await run('cat', [join(mnt, 'etc', 'added.txt')])).stdout).toBe('added in layer 1\n')
    m.proc.kill('SIGTERM')
    expect(await m.exited).toBe(0)
  })

  it('follows a tag that moved; with the registry unreachable, mounts what the tag named before, saying so', async () => {
    await movingTag('embedded', ['--data-dir', join(work, 'data-moving')])
  })

  it('fetches the prioritized files before they are read', async () => {
    // The image's tool is prioritized; nothing is read, yet the registry (behind a proxy that counts) sends it soon
    // after the mount. Reading it then costs no more registry bytes.
    const door = await startWanProxy({ target: registry.host, rttMs: 0, bitsPerSecond: 1_000_000_000 })
    try {
      const mnt = await newDir('mnt-prefetch')
      const ref = prioritized.ref.replace(registry.host, door.host)
      const m = await startMount([ref, mnt, '--data-dir', join(work, 'data-prefetch')])
      const done = /^prefetched the prioritized files \(6\.0 MiB\) in \d+\.\ds$/m
      for (let i = 0; i < 100 && !done.test(m.stderr()); i++) await new Promise((r) => setTimeout(r, 100))
      expect(m.stderr()).toMatch(done)
      expect(door.bytesDown).toBeGreaterThan(6 * 1024 * 1024)
      const before = door.bytesDown
      const sum = await run('sha256sum', [join(mnt, 'usr', 'bin', 'tool')])
      expect(hex(sum.stdout)).toBe(prioritized.layers[0]!.files.get('usr/bin/tool'))
      expect(door.bytesDown).toBe(before)
      m.proc.kill('SIGINT')
      expect(await m.exited).toBe(0)
    } finally {
      await door.stop()
    }
  })

  it('says what to do with a bad mountpoint or bad arguments', async () => {
    const missing = await run(process.execPath, [
      BIN,
      image.ref,
      join(work, 'no-such-dir'),
      '--data-dir',
      join(work, 'data')
    ]).catch((err: Error) => err.message)
    expect(missing).toMatch(/cannot mount at .*no-such-dir: the mountpoint is not usable \(ENOENT\)/)
    expect(missing).toMatch(/hint: create the directory first/)
    const usage = await run(process.execPath, [BIN, image.ref]).catch((err: Error) => err.message)
    expect(usage).toMatch(/failed \(2\)/)
    expect(usage).toMatch(/missing MOUNTPOINT/)
  })
})

describe('p2p-mount through a p2pd (daemon mode)', () => {
  // This process is the p2pd here: it serves the mounts, so only child processes touch them.
  let node: StrataNode
  let control: ControlServer | undefined
  let mounts: MountRoutes | undefined
  let socket: string
  let dataDir: string

  beforeAll(async () => {
    dataDir = await newDir('p2pd')
    socket = join(dataDir, 'p2pd.sock')
    node = await createNode({
      store: createMemoryStore(),
      dataDir,
      listen: ['/ip4/127.0.0.1/tcp/0'],
      registry: createRegistryClient({})
    })
    control = await startControlServer(node, { socket })
    mounts = addMountRoutes(control, node, { dataDir, socket })
  })

  afterAll(async () => {
    await control?.close()
    await node?.stop()
  })

  it('has p2pd serve the mount, and unmount it on SIGTERM', async () => {
    const mnt = await newDir('mnt-daemon')
    const record = join(work, 'record-daemon.txt')
    const m = await startMount([image.ref, mnt, '--record', record], socket)
    expect(m.stdout()).toBe(`mounted ${image.ref} at ${mnt}\n`)
    expect(m.stderr()).toContain(`opened ${image.ref} through p2pd at ${socket}: 2 layers`)
    expect((await run('cat', [join(mnt, 'etc', 'added.txt')])).stdout).toBe('added in layer 1\n')
    const tool = await run('sha256sum', [join(mnt, 'usr', 'bin', 'tool')])
    expect(hex(tool.stdout)).toBe(image.layers[0]!.files.get('usr/bin/tool'))
    expect(node.fetcher.metrics().sources.registry?.bytes).toBeGreaterThan(9 * 1024 * 1024)
    // p2pd lists what it serves, with how each mount reads stored files (this store has no chunk files: off).
    const listed =
      await createControlClient(socket).get<Array<{ mountpoint: string; image: string; fuse: unknown }>>('/mounts')
    expect(listed).toEqual([
      expect.objectContaining({
        mountpoint: mnt,
        image: image.ref,
        fuse: expect.objectContaining({ mode: expect.any(String) })
      })
    ])
    m.proc.kill('SIGTERM')
    expect(await m.exited).toBe(0)
    expect(m.stderr()).toContain(`unmounted ${mnt}`)
    expect(await isMounted(mnt)).toBe(false)
    expect(await readFile(record, 'utf8')).toBe('etc/added.txt\nusr/bin/tool\n')
  })

  it('unmounts when the p2p-mount holding the mount is killed', async () => {
    const mnt = await newDir('mnt-daemon-kill')
    const m = await startMount([image.ref, mnt], socket)
    expect(await isMounted(mnt)).toBe(true)
    m.proc.kill('SIGKILL')
    await m.exited
    for (let i = 0; i < 50 && (await isMounted(mnt)); i++) await new Promise((r) => setTimeout(r, 100))
    expect(await isMounted(mnt)).toBe(false)
    // The mountpoint is free again: a new mount there works.
    const again = await startMount([image.ref, mnt], socket)
    again.proc.kill('SIGINT')
    expect(await again.exited).toBe(0)
  })

  it('follows a tag that moved; with the registry unreachable, mounts what the tag named before, saying so', async () => {
    await movingTag('daemon', [], socket)
  })

  it('keeps the mount when p2pd stops: reads wait, p2p-mount waits, and the next p2pd serves both', async () => {
    const mnt = await newDir('mnt-daemon-stop')
    const m = await startMount([image.ref, mnt], socket)
    const waitFor = async (text: string) => {
      for (let i = 0; i < 100 && !m.stderr().includes(text); i++) await new Promise((r) => setTimeout(r, 100))
      expect(m.stderr()).toContain(text)
    }
    // What p2pd does on SIGTERM: its mounts stay, held for the next p2pd.
    await mounts!.close()
    await control!.close()
    control = undefined
    await waitFor(`p2pd is stopping: the mount at ${mnt} stays, held for the next p2pd`)
    expect(await isMounted(mnt)).toBe(true)
    expect(m.proc.exitCode).toBe(null)
    // Nobody serves the mount now: a reader waits (and its request is kept) until the next p2pd answers it.
    const reader = run('sha256sum', [join(mnt, 'usr', 'bin', 'tool')])
    let read = false
    void reader.then(() => {
      read = true
    })
    await new Promise((r) => setTimeout(r, 500))
    expect(read).toBe(false)

    control = await startControlServer(node, { socket })
    mounts = addMountRoutes(control, node, { dataDir, socket })
    await mounts.resumed
    expect(hex((await reader).stdout)).toBe(image.layers[0]!.files.get('usr/bin/tool'))
    await waitFor(`p2pd at ${socket} serves the mount at ${mnt} again`)
    expect((await run('cat', [join(mnt, 'etc', 'added.txt')])).stdout).toBe('added in layer 1\n')
    m.proc.kill('SIGTERM')
    expect(await m.exited).toBe(0)
    expect(await isMounted(mnt)).toBe(false)
  })
})
