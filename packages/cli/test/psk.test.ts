import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { runCli } from '@test/cli.js'
import { afterAll, describe, expect, it } from 'vitest'

const dir = await mkdtemp(join(tmpdir(), 'strata-psk-'))
afterAll(() => rm(dir, { recursive: true, force: true }))

const run = (argv: string[]) => runCli(argv)

const FORMAT = /^\/key\/swarm\/psk\/1\.0\.0\/\n\/base16\/\n[0-9a-f]{64}\n$/

describe('p2pctl psk new', () => {
  it('prints a fresh libp2p swarm key each time', async () => {
    const a = await run(['psk', 'new'])
    const b = await run(['psk', 'new'])
    expect(a.code).toBe(0)
    expect(a.stdout).toMatch(FORMAT)
    expect(b.stdout).toMatch(FORMAT)
    expect(a.stdout).not.toBe(b.stdout)
  })

  it('writes --out with mode 0600 and never overwrites a key', async () => {
    const file = join(dir, 'swarm.key')
    expect((await run(['psk', 'new', '--out', file])).code).toBe(0)
    const key = await readFile(file, 'utf8')
    expect(key).toMatch(FORMAT)
    expect((await stat(file)).mode & 0o777).toBe(0o600)
    const again = await run(['psk', 'new', '--out', file])
    expect(again.code).toBe(1)
    expect(again.stderr).toMatch(/EEXIST[\s\S]*hint: the file exists/)
    expect(await readFile(file, 'utf8')).toBe(key)
  })
})
