import type { AbortOptions } from '@strata/base'

export interface AnnouncerInit {
  /** Announces one key on the DHT; resolves true when at least one peer took the record. */
  provide(digest: string, options?: AbortOptions): Promise<boolean>
  /** Stops re-announcing a key. */
  withdraw?(digest: string): void
  /**
   * Chunk-key provides running at once (too many and records are silently dropped); coarse keys have as many
   * slots again of their own. Default 4.
   */
  concurrency?: number
  /** Provides started per second at most. Default 40. */
  ratePerSecond?: number
  /** Everything held is announced again this often (records expire). Default 1 hour. */
  reannounceMs?: number
  /** A key that did not land is tried again after this long. Default 5 s. */
  retryMs?: number
}

export interface AnnounceStats {
  /** Keys waiting to be announced (urgent + background). */
  backlog: number
  inflight: number
  /** Keys whose latest announcement landed on at least one peer. */
  landed: number
  /** Announcements that did not land (retried). */
  failed: number
}

/**
 * Announces what the node holds. Coarse keys (layer, TOC digests) go first, as soon as they are known, in slots
 * of their own (never behind chunk keys) and not rate-limited; chunk digests follow in the background, a few at
 * a time and rate-limited, and each is checked to have landed.
 */
export class Announcer {
  private readonly urgent = new Set<string>()
  private readonly background = new Set<string>()
  private readonly held = new Set<string>()
  private readonly coarse = new Set<string>()
  private readonly landedKeys = new Set<string>()
  /** Keys that did not land, waiting to be tried again. */
  private readonly retrying = new Set<string>()
  private retryTimer: NodeJS.Timeout | undefined
  private inflight = 0
  /** Of `inflight`, coarse keys. */
  private inflightCoarse = 0
  private failed = 0
  private tokens: number
  private lastRefill = Date.now()
  private wake: NodeJS.Timeout | undefined
  private reannounce: NodeJS.Timeout | undefined
  private readonly stopping = new AbortController()
  private readonly concurrency: number
  private readonly rate: number
  private readonly retryMs: number
  private idle: Array<() => void> = []

  constructor(private readonly init: AnnouncerInit) {
    this.concurrency = init.concurrency ?? 4
    this.rate = init.ratePerSecond ?? 40
    this.retryMs = init.retryMs ?? 5_000
    this.tokens = this.rate
  }

  start(): void {
    this.reannounce = setInterval(() => this.again(), this.init.reannounceMs ?? 3_600_000)
    this.reannounce.unref()
    this.pump()
  }

  stop(): void {
    this.stopping.abort(new Error('node is shutting down'))
    clearInterval(this.reannounce)
    clearTimeout(this.wake)
    clearTimeout(this.retryTimer)
  }

  /** A coarse key (layer or TOC digest): announced before any chunk key. */
  announceNow(digest: string): void {
    if (this.coarse.has(digest) && this.held.has(digest)) return
    this.coarse.add(digest)
    this.held.add(digest)
    this.background.delete(digest)
    this.urgent.add(digest)
    this.pump()
  }

  /** A chunk key: announced in the background. */
  announce(digest: string): void {
    if (this.held.has(digest)) return
    this.held.add(digest)
    this.background.add(digest)
    this.pump()
  }

  /** The store no longer holds these: stop announcing them. */
  withdraw(digests: Iterable<string>): void {
    for (const d of digests) {
      if (!this.held.delete(d)) continue
      this.urgent.delete(d)
      this.background.delete(d)
      this.landedKeys.delete(d)
      this.retrying.delete(d)
      this.coarse.delete(d)
      this.init.withdraw?.(d)
    }
  }

  isHeld(digest: string): boolean {
    return this.held.has(digest)
  }

  stats(): AnnounceStats {
    return {
      backlog: this.urgent.size + this.background.size + this.retrying.size,
      inflight: this.inflight,
      landed: this.landedKeys.size,
      failed: this.failed
    }
  }

  /** Resolves when every held key has landed: nothing queued, in flight or waiting to be retried. */
  settled(): Promise<void> {
    if (this.pending() === 0) return Promise.resolve()
    return new Promise((resolve) => this.idle.push(resolve))
  }

  /** Tries keys that did not land again now (a peer joined: they have somewhere to land). */
  retryNow(): void {
    clearTimeout(this.retryTimer)
    this.retryTimer = undefined
    for (const d of this.retrying) (this.coarse.has(d) ? this.urgent : this.background).add(d)
    this.retrying.clear()
    this.pump()
  }

  private pending(): number {
    return this.urgent.size + this.background.size + this.inflight + this.retrying.size
  }

  private again(): void {
    for (const d of this.held) (this.coarse.has(d) ? this.urgent : this.background).add(d)
    this.pump()
  }

  private static take(queue: Set<string>): string | undefined {
    const first = queue.values().next()
    if (first.done === true) return undefined
    queue.delete(first.value)
    return first.value
  }

  private pump(): void {
    if (this.stopping.signal.aborted) return
    const now = Date.now()
    this.tokens = Math.min(this.rate, this.tokens + ((now - this.lastRefill) / 1000) * this.rate)
    this.lastRefill = now
    while (this.inflightCoarse < this.concurrency) {
      const digest = Announcer.take(this.urgent)
      if (digest === undefined) break
      this.provide(digest, true)
    }
    while (this.inflight - this.inflightCoarse < this.concurrency && this.tokens >= 1) {
      const digest = Announcer.take(this.background)
      if (digest === undefined) break
      this.tokens--
      this.provide(digest, false)
    }
    if (this.background.size > 0 && this.wake === undefined && this.tokens < 1) {
      this.wake = setTimeout(() => {
        this.wake = undefined
        this.pump()
      }, 1000 / this.rate)
    }
    if (this.pending() === 0) for (const resolve of this.idle.splice(0)) resolve()
  }

  private provide(digest: string, coarse: boolean): void {
    this.inflight++
    if (coarse) this.inflightCoarse++
    void this.init
      .provide(digest, { signal: this.stopping.signal })
      .catch(() => false)
      .then((landed) => this.done(digest, coarse, landed))
  }

  private done(digest: string, coarse: boolean, landed: boolean): void {
    this.inflight--
    if (coarse) this.inflightCoarse--
    if (landed) {
      if (this.held.has(digest)) this.landedKeys.add(digest)
    } else if (!this.stopping.signal.aborted) {
      this.failed++
      this.landedKeys.delete(digest)
      if (this.held.has(digest)) this.retrying.add(digest)
      this.retryTimer ??= setTimeout(() => this.retryNow(), this.retryMs)
      this.retryTimer.unref()
    }
    this.pump()
  }
}
