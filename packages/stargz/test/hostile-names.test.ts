import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough, Readable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { bufferReader, buildEstargz, openLayer } from '../src/index.js'
import { BENIGN_PATHS, BENIGN_TAR, builderMessage, HOSTILE_TARS, tocParserReason } from './hostile-tars.js'

let dir: string

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-hostile-names-'))
})

afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

describe('buildEstargz on tars that name files outside the layer', () => {
  it.each(HOSTILE_TARS.map((c) => [c.label, c] as const))('refuses %s, as the TOC parser does', async (_, c) => {
    const spool = join(dir, `spool-${HOSTILE_TARS.indexOf(c)}`)
    await mkdir(spool)
    const out = new PassThrough()
    let written = 0
    out.on('data', (d: Buffer) => {
      written += d.length
    })
    const err = await buildEstargz(Readable.from([c.tar]), out, { tmpDir: spool }).then(
      () => undefined,
      (e: unknown) => e as Error & { code?: string; hint?: string; reason?: string; offset?: number }
    )
    expect(err?.name).toBe('UnsafeTarEntryError')
    expect(err?.code).toBe('ERR_STARGZ_TAR_UNSAFE_ENTRY')
    // The same rule, in the same words, as the TOC parser that would refuse the layer at mount time.
    const reason = tocParserReason(c)
    expect(err?.reason).toBe(reason)
    expect(err?.message).toBe(builderMessage(c))
    expect(err?.message.endsWith(`: ${reason}`)).toBe(true)
    expect(err?.hint).toMatch(/outside its root/)
    expect(written).toBe(0)
    expect(await readdir(spool)).toEqual([])
  })

  it('has a case for each way out: .., absolute, NUL and empty names and hardlink targets', () => {
    const reasons = HOSTILE_TARS.map(tocParserReason)
    for (const what of ['name', 'hardlink target']) {
      expect(
        reasons.some((r) => r.startsWith(`${what} `) && r.endsWith("contains '..' and could escape the layer"))
      ).toBe(true)
      expect(reasons).toContain(`absolute ${what} "/etc/passwd" is refused`)
      expect(reasons).toContain(`${what} contains a NUL byte`)
      expect(reasons).toContain(`empty ${what}`)
    }
    expect(HOSTILE_TARS.length).toBeGreaterThanOrEqual(30)
  })

  it('still builds names the TOC parser normalises (./a, a/./b, a//b) and symlinks pointing anywhere', async () => {
    const out = new PassThrough()
    const parts: Buffer[] = []
    out.on('data', (d: Buffer) => parts.push(d))
    await buildEstargz(Readable.from([BENIGN_TAR]), out, { tmpDir: dir })
    const layer = await openLayer(bufferReader(Buffer.concat(parts)))
    for (const p of BENIGN_PATHS) expect(layer.toc.lookup(p), p).toBeDefined()
    expect(layer.toc.lookup('d/hl')).toMatchObject({ type: 'hardlink', linkName: 'd/b' })
    expect(layer.toc.lookup('abs-symlink')).toMatchObject({ type: 'symlink', linkName: '/etc/passwd' })
    expect(layer.toc.lookup('up-symlink')).toMatchObject({ type: 'symlink', linkName: '../../etc/passwd' })
    expect(layer.toc.children('d')).toEqual(['b', 'c', 'hl', 'pax', 'x..'])
  })
})
