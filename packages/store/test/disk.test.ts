import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll } from 'vitest'
import { openDiskStore } from '../src/index.js'
import { runStoreCompliance } from './compliance.js'

const dirs: string[] = []
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true })
})

runStoreCompliance('disk', async (init) => {
  const dir = await mkdtemp(join(tmpdir(), 'strata-store-'))
  dirs.push(dir)
  return openDiskStore(dir, init)
})
