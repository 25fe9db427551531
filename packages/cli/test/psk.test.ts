import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough } from 'node:stream'
import { afterAll, describe, expect, it } from 'vitest'
import { Output, p2pctl, runCommand } from '../src/index.js'

const dir = await mkdtemp(join(tmpdir(), 'strata-psk-'))
afterAll(() => rm(dir, { recursive: true, force: true }))

function run(argv: string[]) {
  const stdout = new PassThrough()
  const stderr = new PassThrough()
  let o = ''
  let e = ''
  stdout.on('data', (d) => {
    o += d
  })
  stderr.on('data', (d) => {
    e += d
  })
  return runCommand(p2pctl, argv, new Output(stdout, stderr)).then((code) => ({ code, o, e }))
}

const FORMAT = /^\/key\/swarm\/psk\/1\.0\.0\/\n\/base16\/\n[0-9a-f]{64}\n$/

describe('p2pctl psk new', () => {
  it('prints a fresh libp2p swarm key each time', async () => {
    const a = await run(['psk', 'new'])
    const b = await run(['psk', 'new'])
    expect(a.code).toBe(0)
    expect(a.o).toMatch(FORMAT)
    expect(b.o).toMatch(FORMAT)
    expect(a.o).not.toBe(b.o)
  })

  it('writes --out with mode 0600 and never overwrites a key', async () => {
    const file = join(dir, 'swarm.key')
    expect((await run(['psk', 'new', '--out', file])).code).toBe(0)
    const key = await readFile(file, 'utf8')
    expect(key).toMatch(FORMAT)
    expect((await stat(file)).mode & 0o777).toBe(0o600)
    const again = await run(['psk', 'new', '--out', file])
    expect(again.code).toBe(1)
    expect(again.e).toMatch(/EEXIST[\s\S]*hint: the file exists/)
    expect(await readFile(file, 'utf8')).toBe(key)
  })
})
