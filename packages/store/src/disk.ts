import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { isDiskFull } from './disk-files.js'
import { CHUNK, loadIndex, openIndex } from './disk-index.js'
import { repairStore } from './disk-repair.js'
import { diskSpace } from './disk-space.js'
import { DiskStore } from './disk-store.js'
import { StoreFullError } from './errors.js'
import { Ledger } from './ledger.js'
import type { DiskChunkStore, DiskStoreInit } from './types.js'

// Opening the disk store. Its parts: the layout and the index (disk-index.ts), the repair pass on open
// (disk-repair.ts), the store itself (disk-store.ts), its checkpoints (disk-checkpoint.ts), its file I/O
// (disk-files.ts) and its free-space estimate (disk-space.ts).

/**
 * Most of its file system the store leaves free by default (DiskStoreInit.headroomBytes), and the share of a
 * small one: LevelDB needs room for its log, for turning it into a table (it does so on every open), and for
 * compactions; a few MiB covers that for millions of chunks.
 */
const MAX_HEADROOM_BYTES = 8 * 1024 * 1024
const HEADROOM_SHARE = 1 / 8

/**
 * Opens (or creates) the chunk store in `dir` and takes its lock: only one process may own a store.
 * Runs the repair pass first (which also evicts down to the cap if it was lowered).
 */
export async function openDiskStore(dir: string, init: DiskStoreInit = {}): Promise<DiskChunkStore> {
  const ledger = new Ledger(init.maxBytes)
  const chunksDir = join(dir, 'chunks')
  const indexDir = join(dir, 'index')
  /** A full disk, said plainly (not as a permissions problem), with what is free. */
  const full = async (err: unknown): Promise<never> => {
    if (!isDiskFull(err) && !isDiskFull((err as Error)?.cause)) throw err
    const free = await diskSpace(dir).then(
      (s) => s.free,
      () => undefined
    )
    throw new StoreFullError(dir, undefined, { cause: err, ...(free === undefined ? {} : { free }) })
  }
  await mkdir(chunksDir, { recursive: true }).catch(full)
  const { db, rebuilt } = await openIndex(dir, indexDir).catch(full)
  try {
    await loadIndex(db, ledger)
    const fsync = init.fsync ?? true
    const { gen, ...found } = await repairStore(chunksDir, db, ledger, fsync).catch(full)
    const unknown = { free: Number.POSITIVE_INFINITY, size: 0, block: 4096 }
    let space = await diskSpace(dir).catch(() => unknown)
    const headroom = init.headroomBytes ?? Math.min(MAX_HEADROOM_BYTES, Math.floor(space.size * HEADROOM_SHARE))
    // A disk that filled up while the store was closed (or before it kept headroom): unpinned chunks, least
    // recently used first, make room (asked again after each round: files take whole blocks, the index writes).
    for (let round = 0; space.free < headroom && round < 8; round++) {
      const victims = ledger.shrinkTo(Math.max(0, ledger.bytes - (headroom - space.free)))
      if (victims.length === 0) break
      for (const [digest] of victims) await rm(join(chunksDir, digest.slice(7, 9), digest.slice(7)), { force: true })
      await db.batch(victims.map(([digest]) => ({ type: 'del' as const, key: CHUNK + digest }))).catch(full)
      space = await diskSpace(dir).catch(() => unknown)
    }
    const checkpointMs = init.checkpointMs ?? 1000
    const verifyReads = init.verifyReads ?? true
    const repair = { ...found, indexRebuilt: rebuilt }
    return new DiskStore(dir, db, ledger, repair, {
      fsync,
      gen: gen + 1,
      checkpointMs,
      verifyReads,
      headroom,
      space: { free: space.free, block: space.block }
    })
  } catch (err) {
    await db.close()
    throw err
  }
}
