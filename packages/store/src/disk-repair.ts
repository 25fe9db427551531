import { mkdir, readdir, readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { sha256Hex } from '@strata/base'
import { syncChunks } from './disk-files.js'
import { CHUNK, type Db, decoder, FANOUT, HEX, type Op, recordOp, SYNCED, syncedOp, TMP } from './disk-index.js'
import type { ChunkRecord, Ledger } from './ledger.js'
import type { RepairReport } from './types.js'

/** What repairStore found, and the generation every chunk is durable up to once it has finished. */
type Repaired = Omit<RepairReport, 'indexRebuilt'> & { gen: number }

/**
 * Makes files and index agree after whatever happened before this open (a crash, a power loss, a full disk,
 * tampering). Chunks of generations after the last checkpoint (`synced`) and files without an index entry may
 * hold anything a power loss left: they are read and hashed, kept only if they hash to their name, and then
 * fsynced, so that afterwards every chunk counts as durable.
 */
export async function repairStore(chunksDir: string, db: Db, ledger: Ledger, fsync: boolean): Promise<Repaired> {
  const report = { tempRemoved: 0, missingDropped: 0, reindexed: 0, badRemoved: 0, verified: 0 }
  const value = await db.get(SYNCED)
  const synced = value === undefined ? 0 : Number(decoder.decode(value))
  let gen = synced
  const ops: Op[] = []
  const seen = new Set<string>()
  /** Files this pass read and kept: made durable before the pass records that. */
  const checked: string[] = []
  /** The size of a file whose content hashes to its name, else undefined. */
  const verifiedSize = async (path: string, name: string): Promise<number | undefined> => {
    const bytes = await readFile(path).catch(() => undefined)
    if (bytes === undefined || sha256Hex(bytes) !== name) return undefined
    return bytes.length
  }
  const present = new Set(await readdir(chunksDir))
  for (const fan of FANOUT) {
    const sub = join(chunksDir, fan)
    if (!present.has(fan)) {
      await mkdir(sub)
      continue
    }
    for (const name of await readdir(sub)) {
      const path = join(sub, name)
      if (name.startsWith(TMP)) {
        await rm(path, { force: true, recursive: true })
        report.tempRemoved++
        continue
      }
      const digest = `sha256:${name}`
      const record = name.startsWith(fan) ? ledger.chunks.get(digest) : undefined
      if (record !== undefined) {
        const recordGen = record.gen ?? 0
        gen = Math.max(gen, recordGen)
        if (recordGen <= synced) {
          seen.add(digest)
          continue
        }
        report.verified++
        if ((await verifiedSize(path, name)) === record.size) {
          record.verified = true
          seen.add(digest)
          checked.push(path)
        } else {
          await rm(path, { force: true, recursive: true })
          ledger.remove(digest)
          ops.push({ type: 'del', key: CHUNK + digest })
          report.badRemoved++
        }
        continue
      }
      const size = HEX.test(name) && name.startsWith(fan) ? await verifiedSize(path, name) : undefined
      if (size !== undefined) {
        const added: ChunkRecord = { size, atime: ledger.now(), layers: [], gen: 0, verified: true }
        ledger.add(digest, added)
        ops.push(recordOp(digest, added))
        seen.add(digest)
        checked.push(path)
        report.reindexed++
      } else {
        await rm(path, { force: true, recursive: true })
        report.badRemoved++
      }
    }
  }
  for (const digest of [...ledger.chunks.keys()]) {
    if (seen.has(digest)) continue
    ledger.remove(digest)
    ops.push({ type: 'del', key: CHUNK + digest })
    report.missingDropped++
  }
  // The cap may have been lowered since the last run.
  for (const [digest] of ledger.shrinkTo(ledger.maxBytes)) {
    await rm(join(chunksDir, digest.slice(7, 9), digest.slice(7)), { force: true })
    ops.push({ type: 'del', key: CHUNK + digest })
  }
  if (fsync) await syncChunks(join(chunksDir, '..'), checked)
  if (gen !== synced) ops.push(syncedOp(gen))
  if (ops.length > 0) await db.batch(ops, { sync: true })
  return { ...report, gen }
}
