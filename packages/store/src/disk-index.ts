import { rm } from 'node:fs/promises'
import { Level } from 'level'
import { errorCode } from './disk-files.js'
import { StoreIOError, StoreLockedError } from './errors.js'
import type { ChunkRecord, Ledger } from './ledger.js'

/*
 * Layout of a store directory:
 *   chunks/ab/<hex>         chunk bytes, named by the hex of their sha256; 256 fan-out directories (one level,
 *                           as cvmfs: the repair pass lists them all on open, 65536 two-level ones cost more)
 *   chunks/ab/.tmp-<hex>-*  a put in progress: written here, then renamed over <hex>
 *   index/                  LevelDB: c!<digest> -> {s,a,l,g} (size, last access, layers, generation),
 *                           p!<name>\0<digest> -> '' (pins), m!<key> -> bytes (metadata),
 *                           s!synced -> the last generation made durable
 * A chunk file is complete under its real name or absent as long as the kernel survives; the index follows
 * the files, and the repair pass makes them agree after a crash.
 */

export const FANOUT = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'))
export const TMP = '.tmp-'
export const HEX = /^[0-9a-f]{64}$/
export const CHUNK = 'c!'
export const PIN = 'p!'
export const META = 'm!'
export const SYNCED = 's!synced'

export type Op = { type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string }
export type Db = Level<string, Uint8Array>

const encoder = new TextEncoder()
export const decoder = new TextDecoder()

export function recordOp(digest: string, r: ChunkRecord): Op {
  const value = encoder.encode(JSON.stringify({ s: r.size, a: r.atime, l: r.layers, g: r.gen ?? 0 }))
  return { type: 'put', key: CHUNK + digest, value }
}

/** Records without a generation were written by a store that fsynced every put: durable. */
function decodeRecord(value: Uint8Array): ChunkRecord {
  const v = JSON.parse(decoder.decode(value)) as { s: number; a: number; l?: string[]; g?: number }
  return { size: v.s, atime: v.a, layers: v.l ?? [], gen: v.g ?? 0, verified: false }
}

export function syncedOp(gen: number): Op {
  return { type: 'put', key: SYNCED, value: encoder.encode(String(gen)) }
}

/**
 * Group commit: index operations queued while a batch is being written go into the next batch, so many puts
 * share one LevelDB write. A batch is written synchronously (LevelDB fsyncs its log) when any of its writes
 * asked for it; LevelDB's log is ordered, so that also makes every earlier batch durable.
 */
export class IndexWriter {
  private readonly db: Db
  private queue: Op[] = []
  private sync = false
  private waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = []
  private running: Promise<void> | undefined

  constructor(db: Db) {
    this.db = db
  }

  write(ops: Op[], sync = false): Promise<void> {
    this.queue.push(...ops)
    this.sync ||= sync
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject })
      this.running ??= this.drain()
    })
  }

  /** Resolves when everything queued so far is written. */
  async idle(): Promise<void> {
    while (this.running !== undefined) await this.running
  }

  private async drain(): Promise<void> {
    while (this.waiters.length > 0) {
      const ops = this.queue
      const sync = this.sync
      const waiters = this.waiters
      this.queue = []
      this.sync = false
      this.waiters = []
      try {
        if (ops.length > 0) await this.db.batch(ops, { sync })
        for (const w of waiters) w.resolve()
      } catch (err) {
        for (const w of waiters) w.reject(err)
      }
    }
    this.running = undefined
  }
}

export async function loadIndex(db: Db, ledger: Ledger): Promise<void> {
  const records: Array<[string, ChunkRecord]> = []
  // Many chunks share a layer: keep one copy of each layer digest in memory.
  const layers = new Map<string, string>()
  for await (const [key, value] of db.iterator({ gte: CHUNK, lt: 'c"' })) {
    const record = decodeRecord(value)
    record.layers = record.layers.map((layer) => {
      const known = layers.get(layer)
      if (known !== undefined) return known
      layers.set(layer, layer)
      return layer
    })
    records.push([key.slice(CHUNK.length), record])
  }
  records.sort((a, b) => a[1].atime - b[1].atime)
  for (const [digest, record] of records) ledger.add(digest, record)
  for await (const key of db.keys({ gte: PIN, lt: 'p"' })) {
    const sep = key.lastIndexOf('\0')
    ledger.pin(key.slice(PIN.length, sep), [key.slice(sep + 1)])
  }
}

/**
 * Opens the index. A damaged one is deleted and started afresh: it only caches what the chunk files say, and
 * the repair pass then indexes every file again after verifying it (pins and metadata are lost).
 */
export async function openIndex(dir: string, indexDir: string): Promise<{ db: Db; rebuilt: boolean }> {
  for (let rebuilt = false; ; rebuilt = true) {
    const db: Db = new Level<string, Uint8Array>(indexDir, { valueEncoding: 'view' })
    try {
      await db.open()
      return { db, rebuilt }
    } catch (err) {
      const cause = errorCode((err as Error)?.cause)
      if (cause === 'LEVEL_LOCKED') throw new StoreLockedError(dir, { cause: err })
      if (cause !== 'LEVEL_CORRUPTION' || rebuilt) throw new StoreIOError('open', indexDir, { cause: err })
      await rm(indexDir, { recursive: true, force: true })
    }
  }
}
