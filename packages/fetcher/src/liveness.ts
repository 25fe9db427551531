import { SourceTimeoutError } from './errors.js'

/**
 * A source silent this long is given up. With p2pd's 8 s before the registry is asked beside a silent peer, a read
 * whose sources all stall fails after 32 s; the kernel's retry of it after 2 more (stalledTimeoutMs for each
 * source): within 35 s of the stall, as the read path promises (docs/ARCHITECTURE.md). The registry client's idle
 * timeout (30 s) is longer: a stalled Range read is given up (and cancelled) before it is retried, whose first
 * bytes would look like progress again.
 */
export const DEFAULT_SOURCE_TIMEOUT_MS = 24_000
export const DEFAULT_STALLED_TIMEOUT_MS = 1_000
export const DEFAULT_HEDGE_DELAY_MS = 300

/** The liveness settings of an engine (see FetcherInit). */
export interface LivenessLimits {
  sourceTimeoutMs: number
  stalledTimeoutMs: number
}

/** How a source is doing, for its liveness timeout: one per source, shared by every ask to it. */
export interface Liveness {
  /** When it last made progress (a verified chunk, or its `onProgress`), in performance.now() time. */
  progressAt: number
  /** Since it was given up for making no progress (`at`), having made none since `since`; until it delivers a chunk. */
  stalled?: { at: number; since: number }
  /** The watchdogs of the asks waiting on it: run at once when it is found stalled. */
  watchers: Set<() => void>
}

export function newLiveness(): Liveness {
  return { progressAt: Number.NEGATIVE_INFINITY, watchers: new Set() }
}

/**
 * The watchdog of one ask to a source. Liveness, not total time: the ask is given up once the source has made no
 * progress (for anyone) for sourceTimeoutMs since the ask started. A source working through a long queue is alive.
 * One given up is stalled: its asks get stalledTimeoutMs, and those waiting on it are given up with this one.
 */
export class LivenessWatch {
  /** Why this ask was given up, once it was. */
  gaveUp: SourceTimeoutError | undefined
  readonly started = performance.now()
  private timer: NodeJS.Timeout | undefined
  private readonly source: string
  private readonly state: Liveness
  private readonly limits: LivenessLimits
  private readonly giveUp: (err: SourceTimeoutError) => void

  /** Starts watching at once; `giveUp` is called (once) with the reason when the ask is given up. */
  constructor(source: string, state: Liveness, limits: LivenessLimits, giveUp: (err: SourceTimeoutError) => void) {
    this.source = source
    this.state = state
    this.limits = limits
    this.giveUp = giveUp
    state.watchers.add(this.check)
    this.check()
  }

  /** Bytes arriving keep an ask alive. */
  readonly progress = (): void => {
    this.state.progressAt = performance.now()
  }

  /** Only a chunk delivered shows a stalled source has recovered (one that sends a few bytes of each request and then nothing stays stalled). */
  delivered(): void {
    this.state.progressAt = performance.now()
    this.state.stalled = undefined
  }

  stop(): void {
    clearTimeout(this.timer)
    this.state.watchers.delete(this.check)
  }

  private readonly check = (): void => {
    clearTimeout(this.timer)
    const { state, limits } = this
    const now = performance.now()
    const quiet = now - Math.max(this.started, state.progressAt)
    const stalled = state.stalled !== undefined && now - state.stalled.at < limits.sourceTimeoutMs
    const limit = stalled ? limits.stalledTimeoutMs : limits.sourceTimeoutMs
    if (quiet < limit) {
      this.timer = setTimeout(this.check, limit - quiet)
      return
    }
    state.watchers.delete(this.check)
    if (stalled) {
      const silent = Math.round(now - state.stalled!.since)
      this.gaveUp = new SourceTimeoutError(this.source, '', Math.round(quiet), { stalledMs: silent })
    } else {
      this.gaveUp = new SourceTimeoutError(this.source, '', limits.sourceTimeoutMs)
      state.stalled = { at: now, since: Math.max(this.started, state.progressAt) }
      // The others waiting on it have waited long enough too (more than stalledTimeoutMs, as a rule).
      for (const other of [...state.watchers]) other()
    }
    this.giveUp(this.gaveUp)
  }
}

/**
 * The longest a read waits when every one of `sources` sources stalls (accepts the request, then sends nothing),
 * with these settings: `freshMs` for a read that starts as they stall (the next source is asked after
 * min(hedgeDelayMs, sourceTimeoutMs), each given sourceTimeoutMs), `knownMs` for one that starts once they were
 * found stalled, such as the kernel's retry of a read that just failed (each given stalledTimeoutMs).
 */
export function stallBound(
  init: { hedgeDelayMs?: number; sourceTimeoutMs?: number; stalledTimeoutMs?: number } = {},
  sources = 1
): { freshMs: number; knownMs: number } {
  const hedge = init.hedgeDelayMs ?? DEFAULT_HEDGE_DELAY_MS
  const timeout = init.sourceTimeoutMs ?? DEFAULT_SOURCE_TIMEOUT_MS
  const stalled = init.stalledTimeoutMs ?? DEFAULT_STALLED_TIMEOUT_MS
  const n = Math.max(1, sources)
  return {
    freshMs: (n - 1) * Math.min(hedge, timeout) + timeout,
    knownMs: (n - 1) * Math.min(hedge, stalled) + stalled
  }
}
