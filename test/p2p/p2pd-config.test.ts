import { spawn, spawnSync } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buildCli } from '@test/cluster.js'
import { freePort } from '@test/registry.js'
import { repoRoot } from '@test/tools.js'
import { afterAll, beforeAll, expect, it } from 'vitest'

let dir: string

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-p2pd-config-'))
  await buildCli()
})

afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

/** Runs p2pd until its ready line, then p2pctl against it, then stops it with SIGTERM. */
async function withP2pd(args: string[], env: Record<string, string>, then: (ready: string) => Promise<void>) {
  const proc = spawn(process.execPath, [join(repoRoot, 'packages/cli/bin/p2pd.js'), ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let out = ''
  let err = ''
  proc.stderr.setEncoding('utf8').on('data', (d: string) => {
    err += d
  })
  const exited = new Promise<number | null>((resolve) => proc.once('exit', resolve))
  const ready = await new Promise<string>((resolve, reject) => {
    proc.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d
      const m = /^p2pd ready: .*$/m.exec(out)
      if (m !== null) resolve(m[0])
    })
    void exited.then((code) => reject(new Error(`p2pd exited (${code}): ${err}`)))
  })
  try {
    await then(ready)
  } finally {
    proc.kill('SIGTERM')
  }
  expect(await exited).toBe(0)
}

function p2pctl(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [join(repoRoot, 'packages/cli/bin/p2pctl.js'), ...args], { stdio: 'pipe' })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d
    })
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d
    })
    child.once('exit', (code) => resolve({ code, stdout, stderr }))
  })
}

it('p2pd takes flags over STRATA_* variables over the config file; p2pctl status reads it', async () => {
  const [p1, p2, p3] = [await freePort(), await freePort(), await freePort()]
  const config = join(dir, 'p2pd.json')
  await writeFile(
    config,
    JSON.stringify({
      'data-dir': join(dir, 'data'),
      listen: [`/ip4/127.0.0.1/tcp/${p1}`],
      socket: join(dir, 'from-config.sock'),
      'metrics-listen': `127.0.0.1:${p3}`
    })
  )
  const socket = join(dir, 'from-env.sock')
  await withP2pd(
    ['--config', config, '--listen', `/ip4/127.0.0.1/tcp/${p2}`],
    { STRATA_SOCKET: socket, STRATA_LISTEN: `/ip4/127.0.0.1/tcp/${p1}` },
    async (ready) => {
      expect(ready).toMatch(
        new RegExp(`^p2pd ready: peer 12D3\\S+ listening on /ip4/127\\.0\\.0\\.1/tcp/${p2}/p2p/\\S+, socket ${socket}`)
      )
      const text = await (await fetch(`http://127.0.0.1:${p3}/metrics`)).text()
      expect(text).toMatch(/^strata_peers 0$/m)
      // The global option before the command, as operators' scripts write it.
      const human = await p2pctl(['--socket', socket, 'status'])
      expect(human.code).toBe(0)
      expect(human.stdout).toMatch(/^peerId: 12D3/m)
      expect(human.stdout).toMatch(/^fetched: .*registry 0 B/m)
      expect(human.stdout).toMatch(/^fetched-for-peers: /m)
      expect(human.stdout).toMatch(/^fuse: no mounts; /m)
      const json = await p2pctl(['status', '--json', '--socket', socket])
      const s = JSON.parse(json.stdout) as Record<string, unknown>
      expect(Object.keys(s)).toEqual(expect.arrayContaining(['peerId', 'addrs', 'peers', 'bytes']))
      expect(s.bytes).toMatchObject({ served: 0, fetched: { peer: 0, registry: 0 } })
    }
  )
})

it('p2pd refuses bad settings with a usage error, and p2pctl says when p2pd is not running', async () => {
  const bad = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [join(repoRoot, 'packages/cli/bin/p2pd.js'), '--cache-size', 'lots'], {
      stdio: ['ignore', 'ignore', 'pipe']
    })
    let stderr = ''
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d
    })
    child.once('exit', (code) => resolve({ code, stderr }))
  })
  expect(bad.code).toBe(2)
  expect(bad.stderr).toMatch(/cache size 'lots' is not a byte count/)
  const onOff = spawnSync(
    process.execPath,
    [join(repoRoot, 'packages/cli/bin/p2pd.js'), '--fuse-passthrough', 'maybe'],
    {
      encoding: 'utf8'
    }
  )
  expect(onOff.status).toBe(2)
  expect(onOff.stderr).toMatch(/--fuse-passthrough must be on or off, not 'maybe'/)
  const down = await p2pctl(['status', '--socket', join(dir, 'nobody.sock')])
  expect(down.code).toBe(1)
  expect(down.stderr).toMatch(/cannot reach p2pd on .*nobody\.sock/)
  expect(down.stderr).toMatch(/^hint: is p2pd running\?/m)
})
