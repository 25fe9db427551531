import { type ChildProcess, spawn } from 'node:child_process'
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { canServeDirectly, isMounted } from '@strata/fs'
import { writableDirOf } from '@strata/mounts'
import { buildCli, type P2pdProcess, startP2pd } from '@test/cluster.js'
import { buildTestImage, makeTestTree, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { repoRoot, run } from '@test/tools.js'
import { startWanProxy, type WanProxy } from '@test/wan-proxy.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

// p2pd restarts under the mounts it serves, as real processes: killed (SIGKILL, a crash) with a file of the
// mount open and a read in progress, and stopped (SIGTERM, as for an upgrade). The FUSE session holder keeps
// the mounts; the next p2pd serves them again and answers what waited; p2p-mount waits and resumes.

const BIN = join(repoRoot, 'packages', 'cli', 'bin', 'p2p-mount.js')

let work: string
let registry: TestRegistry
let slow: WanProxy
let image: TestImage
const running = new Set<ChildProcess>()
const daemons = new Set<P2pdProcess>()

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-restart-'))
  await buildCli()
  registry = await startRegistry()
  image = await buildTestImage({
    registry: registry.host,
    repository: 'fs/restart',
    estargz: true,
    layers: [{ files: await makeTestTree(join(work, 'tree')) }]
  })
  // 40 Mbit/s: the 9 MiB file takes about two seconds, long enough to kill p2pd in the middle of reading it.
  slow = await startWanProxy({ target: registry.host, rttMs: 10, bitsPerSecond: 40_000_000 })
})

afterAll(async () => {
  for (const p of running) p.kill('SIGKILL')
  for (const d of daemons) await d.stop('SIGKILL')
  await slow?.stop()
  await registry?.stop()
  if (work !== undefined) {
    // What is still mounted under it goes (overlays before what is under them); the holder then has no session
    // left and exits by itself.
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
    const under = mountinfo
      .split('\n')
      .map((l) => l.split(' ')[4] ?? '')
      .filter((p) => p.startsWith(`${work}/`))
    for (const dir of under.reverse()) await run('umount', ['-l', dir]).catch(() => {})
    await rm(work, { recursive: true, force: true })
  }
})

const sha = (text: string) => text.trim().split(/\s+/)[0]
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function until(what: string, check: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  for (const end = Date.now() + ms; !(await check()); await sleep(50)) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
  }
}

async function p2pd(dataDir: string): Promise<P2pdProcess> {
  const d = await startP2pd({ dataDir })
  daemons.add(d)
  void d.stop // exits are awaited by the tests
  d.proc.once('exit', () => daemons.delete(d))
  return d
}

interface Mounted {
  proc: ChildProcess
  stderr(): string
  exited: Promise<number | null>
}

/** p2p-mount through the p2pd on `socket`, until its `mounted` line. */
async function mount(args: string[], socket: string): Promise<Mounted> {
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
  await Promise.race([
    until('p2p-mount to mount', () => /^mounted /m.test(out), 60_000),
    exited.then((code) => Promise.reject(new Error(`p2p-mount exited ${code}: ${err}`)))
  ])
  return { proc, stderr: () => err, exited }
}

/** A command on the mount, run to its end by a child process (this process must not touch the mount). */
function start(cmd: string, args: string[], input = false) {
  const proc = spawn(cmd, args, { stdio: [input ? 'pipe' : 'ignore', 'pipe', 'pipe'] })
  running.add(proc)
  let stdout = ''
  let stderr = ''
  proc.stdout!.on('data', (d) => {
    stdout += d
  })
  proc.stderr!.on('data', (d) => {
    stderr += d
  })
  let finished = false
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    proc.on('exit', (code) => {
      finished = true
      running.delete(proc)
      resolve({ code, stdout, stderr })
    })
  )
  return { proc, done, finished: () => finished, stdout: () => stdout }
}

describe('mounts served by p2pd outlive p2pd', () => {
  it('after a SIGKILL, the next p2pd answers a read in progress and a file held open, with the right bytes', async () => {
    const data = join(work, 'p2pd-kill')
    await mkdir(data)
    const first = await p2pd(data)
    const mnt = join(work, 'mnt-kill')
    await mkdir(mnt)
    const record = join(work, 'record-kill.txt')
    const ref = image.ref.replace(registry.host, slow.host)
    const m = await mount([ref, mnt, '--record', record], first.socket)

    // A file held open from before the kill, read after the restart. Read once first, so that it is in the store
    // and (with passthrough) held open with its chunk file as backing file.
    const conf = join(mnt, 'etc', 'conf3.txt')
    const confText = `${'seed 1 file 3\n'.repeat(1 + 3 * 37)}`
    expect((await run('cat', [conf])).stdout).toBe(confText)
    const held = start('sh', ['-c', 'exec 3< "$1" && echo open && read go && cat <&3', 'sh', conf], true)
    await until('the file to be open', () => held.stdout() === 'open\n')
    // A read in progress: the 9 MiB file, chunk by chunk over the slow link.
    const before = slow.bytesDown
    const reader = start('sha256sum', [join(mnt, 'usr', 'bin', 'tool')])
    await until('the read to be under way', () => slow.bytesDown - before > 1024 * 1024)
    expect(reader.finished()).toBe(false)

    expect(await first.stop('SIGKILL')).toBe(null)
    await sleep(300)
    expect(await isMounted(mnt)).toBe(true)
    expect(reader.finished()).toBe(false) // its requests wait in the holder
    expect(m.proc.exitCode).toBe(null)

    const second = await p2pd(data)
    const read = await reader.done
    expect(read.stderr).toBe('')
    expect(sha(read.stdout)).toBe(image.layers[0]!.files.get('usr/bin/tool'))
    // Opened again while the first open from before the kill still is: the kernel wants it opened as the
    // first was (with the same backing file, or without), which the next p2pd knows from the open log.
    expect((await run('cat', [conf])).stdout).toBe(confText)
    held.proc.stdin!.end('go\n')
    const text = await held.done
    expect(text.stdout).toBe(`open\n${'seed 1 file 3\n'.repeat(1 + 3 * 37)}`)
    const waited = new RegExp(`serving \\S+ at ${mnt} again \\((\\d+) requests waited\\)`).exec(second.stderr())
    if (canServeDirectly()) {
      // p2pd served the connection from its own descriptor, and the kernel sent the read in progress again
      // (FUSE_NOTIFY_RESEND): the holder kept no copy to count.
      expect(await readFile(join(data, 'fuse', 'holder.log'), 'utf8')).toContain('served from its own descriptor')
      expect(waited).not.toBe(null)
    } else expect(Number(waited?.[1])).toBeGreaterThan(0) // the read in progress, at least
    await until('p2p-mount to resume', () => m.stderr().includes(`serves the mount at ${mnt} again`))
    expect(m.stderr()).toContain(`lost p2pd at ${first.socket}; the mount at ${mnt} stays`)

    // p2p-mount still ends its mount, and the record goes on from where the first p2pd left it.
    m.proc.kill('SIGTERM')
    expect(await m.exited).toBe(0)
    expect(await isMounted(mnt)).toBe(false)
    expect((await readFile(record, 'utf8')).split('\n').sort()).toEqual(['', 'etc/conf3.txt', 'usr/bin/tool'])
    expect(await second.stop()).toBe(0)
  })

  it('keeps its mounts on SIGTERM; the next p2pd serves them again and ends one whose p2p-mount died meanwhile', async () => {
    const data = join(work, 'p2pd-term')
    await mkdir(data)
    const first = await p2pd(data)
    const [kept, orphan] = [join(work, 'mnt-kept'), join(work, 'mnt-orphan')]
    for (const dir of [kept, orphan]) await mkdir(dir)
    // Both writable, as a container's root is: an overlay on the FUSE mount, which the holder keeps.
    const a = await mount([image.ref, kept, '--writable'], first.socket)
    const b = await mount([image.ref, orphan, '--writable'], first.socket)
    await run('sh', ['-c', `echo changed > ${orphan}/etc/conf1.txt && echo mine > ${kept}/etc/conf1.txt`])

    expect(await first.stop('SIGTERM')).toBe(0)
    for (const m of [a, b]) await until('the p2p-mounts to wait', () => m.stderr().includes('held for the next p2pd'))
    expect(await isMounted(kept)).toBe(true)
    expect(await isMounted(orphan)).toBe(true)
    // While p2pd is away, one p2p-mount is killed: nobody wants its mount any more.
    b.proc.kill('SIGKILL')
    await b.exited

    const second = await p2pd(data)
    const lower = join(writableDirOf(data, orphan), 'lower')
    await until('the orphan to be unmounted', async () => !(await isMounted(orphan)) && !(await isMounted(lower)))
    expect(second.stderr()).toMatch(/the p2p-mount \(pid \d+\) of .*mnt-orphan is gone: unmounting it/)
    expect(await readFile(join(writableDirOf(data, orphan), 'upper', 'etc', 'conf1.txt'), 'utf8')).toBe('changed\n')

    await until('p2p-mount to resume', () => a.stderr().includes(`serves the mount at ${kept} again`))
    expect((await run('cat', [join(kept, 'etc', 'conf1.txt')])).stdout).toBe('mine\n')
    expect((await run('cat', [join(kept, 'etc', 'conf2.txt')])).stdout).toMatch(/^seed 1 file 2\n/)
    await run('sh', ['-c', `echo after > ${kept}/new-file`])
    a.proc.kill('SIGTERM')
    expect(await a.exited).toBe(0)
    expect(await isMounted(kept)).toBe(false)
    expect(await isMounted(join(writableDirOf(data, kept), 'lower'))).toBe(false)
    expect(await readFile(join(writableDirOf(data, kept), 'upper', 'new-file'), 'utf8')).toBe('after\n')
    expect(await second.stop()).toBe(0)

    // With no session left, the holder exits by itself.
    const log = join(data, 'fuse', 'holder.log')
    await until('the holder to exit', async () => (await readFile(log, 'utf8')).includes('no sessions left'))
  })
})
