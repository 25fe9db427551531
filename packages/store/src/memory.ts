import type { AbortOptions } from '@strata/base'
import { StoreClosedError } from './errors.js'
import { assertDigest, assertOffset, Ledger } from './ledger.js'
import type {
  EvictEventDetail,
  GcOptions,
  GcResult,
  LocalChunkStore,
  MemoryStoreInit,
  PutEventDetail,
  PutOptions,
  StoreErrorEventDetail,
  StoreStats
} from './types.js'

/** Chunks in a Map. Copies bytes in and out, so no caller can change what another reads. */
class MemoryStore extends EventTarget implements LocalChunkStore {
  private readonly ledger: Ledger
  private readonly data = new Map<string, Uint8Array>()
  private readonly meta = new Map<string, Uint8Array>()
  private closed = false

  constructor(init: MemoryStoreInit) {
    super()
    this.ledger = new Ledger(init.maxBytes)
  }

  async get(digest: string, options?: AbortOptions): Promise<Uint8Array | undefined> {
    this.check(options, digest)
    const record = this.ledger.chunks.get(digest)
    if (record === undefined) {
      this.ledger.misses++
      return undefined
    }
    this.ledger.touch(digest, record)
    this.ledger.hits++
    return this.data.get(digest)!.slice()
  }

  async read(digest: string, offset: number, into: Uint8Array, options?: AbortOptions): Promise<number | undefined> {
    this.check(options, digest)
    assertOffset(offset)
    const record = this.ledger.chunks.get(digest)
    if (record === undefined) return undefined
    this.ledger.touch(digest, record)
    if (offset === 0) this.ledger.hits++
    const bytes = this.data.get(digest)!.subarray(offset, offset + into.length)
    into.set(bytes)
    return bytes.length
  }

  async has(digest: string, options?: AbortOptions): Promise<boolean> {
    this.check(options, digest)
    return this.ledger.chunks.has(digest)
  }

  async put(digest: string, bytes: Uint8Array, options?: PutOptions): Promise<void> {
    this.check(options, digest)
    const layer = options?.layer
    const existing = this.ledger.chunks.get(digest)
    if (existing !== undefined) {
      this.ledger.touch(digest, existing)
      if (layer !== undefined && !existing.layers.includes(layer)) existing.layers.push(layer)
      return
    }
    let victims: ReturnType<Ledger['reserve']>
    try {
      victims = this.ledger.reserve(digest, bytes.length)
    } catch (err) {
      // No room beside the pinned chunks under the cap: a write that failed, counted and announced.
      this.ledger.writeErrors++
      const detail: StoreErrorEventDetail = { operation: 'put', digest, error: err as Error }
      this.dispatchEvent(new CustomEvent('error', { detail }))
      throw err
    }
    this.ledger.release(bytes.length)
    this.drop(victims.map(([d]) => d))
    this.data.set(digest, bytes.slice())
    this.ledger.add(digest, {
      size: bytes.length,
      atime: this.ledger.now(),
      layers: layer === undefined ? [] : [layer]
    })
    const detail: PutEventDetail = { digest, size: bytes.length, ...(layer === undefined ? {} : { layer }) }
    this.dispatchEvent(new CustomEvent('put', { detail }))
  }

  async delete(digest: string, options?: AbortOptions): Promise<boolean> {
    this.check(options, digest)
    if (this.ledger.remove(digest) === undefined) return false
    this.data.delete(digest)
    return true
  }

  async *keys(options?: AbortOptions): AsyncIterable<string> {
    this.check(options)
    for (const digest of [...this.ledger.chunks.keys()]) {
      options?.signal?.throwIfAborted()
      yield digest
    }
  }

  async stats(options?: AbortOptions): Promise<StoreStats> {
    this.check(options)
    return this.ledger.stats()
  }

  async pin(name: string, digests: Iterable<string>, options?: AbortOptions): Promise<void> {
    this.check(options)
    const list = [...digests]
    for (const digest of list) assertDigest(digest)
    this.ledger.pin(name, list)
  }

  async unpin(name: string, options?: AbortOptions): Promise<void> {
    this.check(options)
    this.ledger.unpin(name)
  }

  async getMeta(key: string, options?: AbortOptions): Promise<Uint8Array | undefined> {
    this.check(options)
    return this.meta.get(key)?.slice()
  }

  async putMeta(key: string, value: Uint8Array, options?: AbortOptions): Promise<void> {
    this.check(options)
    this.meta.set(key, value.slice())
  }

  async gc(options?: GcOptions): Promise<GcResult> {
    this.check(options)
    const victims = this.ledger.shrinkTo(options?.targetBytes ?? this.ledger.maxBytes)
    this.drop(victims.map(([d]) => d))
    return { evicted: victims.length, freedBytes: victims.reduce((n, [, r]) => n + r.size, 0), orphansRemoved: 0 }
  }

  async close(): Promise<void> {
    this.closed = true
  }

  private drop(digests: string[]): void {
    if (digests.length === 0) return
    for (const digest of digests) this.data.delete(digest)
    const detail: EvictEventDetail = { digests }
    this.dispatchEvent(new CustomEvent('evict', { detail }))
  }

  private check(options: AbortOptions | undefined, digest?: string): void {
    options?.signal?.throwIfAborted()
    if (this.closed) throw new StoreClosedError('in memory')
    if (digest !== undefined) assertDigest(digest)
  }
}

/** A chunk store in memory: for tests, and for short-lived embedded use. */
export function createMemoryStore(init: MemoryStoreInit = {}): LocalChunkStore {
  return new MemoryStore(init)
}
