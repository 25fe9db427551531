import { mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { FileOpenLog } from '../src/open-log.js'

describe('the open log of a session served directly', () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'strata-open-log-'))
  })
  afterAll(() => rm(dir, { recursive: true, force: true }))

  it('gives the next process what is still open, and stays small however many opens came and went', async () => {
    const path = join(dir, 'opens-1-1.log')
    const log = new FileOpenLog(path)
    await log.opened(7, 3)
    await log.opened(8, undefined)
    // Many files opened and closed meanwhile, some at once.
    for (let i = 0; i < 3000; i++) {
      await Promise.all([log.opened(100 + i, i), log.opened(10_000 + i, undefined)])
      await Promise.all([log.released(100 + i), log.released(10_000 + i)])
    }
    await log.opened(9, 12)
    await log.released(8)
    await log.close()
    expect((await stat(path)).size).toBeLessThan(64 * 1024)
    const { log: next, open } = await FileOpenLog.take(path)
    expect([...open]).toEqual([
      [7, 3],
      [9, 12]
    ])
    expect(await readFile(path, 'utf8')).toBe('+7 3\n+9 12\n')
    await next.close(true)
    expect((await FileOpenLog.take(path)).open.size).toBe(0)
  })
})
