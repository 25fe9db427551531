import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { buildCli } from '@test/cluster.js'
import { repoRoot } from '@test/tools.js'
import { beforeAll, expect, it } from 'vitest'

beforeAll(() => buildCli(), 300_000)

/** The README's first command, as an operator runs it (set-up skipped: the test run has done it). */
it('the quick start: a warm peer serves a lazy mount, the registry serves nothing, everything is cleaned up', async () => {
  const proc = spawn('bash', [join(repoRoot, 'deploy/quickstart.sh')], {
    env: { ...process.env, STRATA_SKIP_SETUP: '1' },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  proc.stdout.on('data', (d: Buffer) => {
    output += d.toString()
  })
  proc.stderr.on('data', (d: Buffer) => {
    output += d.toString()
  })
  const code = await new Promise<number | null>((resolve) => proc.once('exit', resolve))
  expect(code, output).toBe(0)
  expect(output).toContain('hello from inside a lazily mounted image')
  expect(output).toMatch(/mounted \S+\/demo:estargz at /)
  expect(output).toMatch(/from registry: 0\.0 MiB/)
  // Some bytes came from the peer: how many depends on how far the background read-ahead got (0.2-3.0 MiB measured).
  expect(Number(/from peers: +([\d.]+) MiB/.exec(output)?.[1])).toBeGreaterThan(0)
  const work = /removing (\/tmp\/strata-quickstart\.\w+)/.exec(output)?.[1]
  expect(work).toBeDefined()
  expect(existsSync(work!)).toBe(false)
}, 300_000)
