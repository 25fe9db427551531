/** What we have measured of one peer. */
export interface PeerScore {
  peer: string
  /** Smoothed round trip of a request, ms. */
  latencyMs: number
  /** Smoothed throughput, bytes/s. */
  throughput: number
  served: number
  /**
   * Failures in a row since the peer last answered: incidents, not requests. Requests that were in flight
   * together when one of them failed (a reset connection fails them all at once) count as one.
   */
  failures: number
  bad: number
  /** `busy` refusals: the peer is alive but loaded. They are not failures; the peer is asked less for a moment. */
  busy: number
  /** Bans in a row; each lasts twice as long as the one before, and a request answered after a ban ends the run. */
  bans: number
  /** Epoch ms until which the peer is not asked; 0 when not banned. */
  bannedUntil: number
}

export interface PeerBookInit {
  /** Failures in a row (incidents, see PeerScore.failures) that ban a peer, if they span sustainMs. Default 3. */
  banAfter?: number
  /**
   * How long a peer must have been failing (since the first failure of the run, no answer since) before it is
   * banned: a peer whose connection was reset fails a few times while it is dialled again, and that is no reason to
   * ban it. Default 5 s.
   */
  sustainMs?: number
  /** The longest ban, ms. Default 10 minutes. */
  banMs?: number
  /** The first ban for failures, ms; each further ban in a row doubles it, up to banMs. Default 10 s. */
  firstBanMs?: number
  /** The first ban for bytes that failed verification, ms; doubles in the same way. Default 1 minute. */
  badBanMs?: number
  /**
   * A failure of a request whose start the caller did not give is one incident with the last failure this
   * close to it, ms. Default 1 s.
   */
  burstMs?: number
}

interface PeerState {
  score: PeerScore
  /** When the last failure that counted happened (0: none since the peer last answered). */
  lastFailureAt: number
  /** When the first failure of the current run happened (0: none since the peer last answered). */
  firstFailureAt: number
  lastSuccessAt: number
  /** A ban ended and the peer has not answered since: one more failure bans it again (for twice as long). */
  probation: boolean
  /** Until then, the peer ranks behind others (it said it was busy). */
  busyUntil: number
}

/** How long a busy refusal sends a peer to the back of the ranking. */
const BUSY_MS = 2_000

/**
 * Ranks peers by what we measured (latency, throughput) and keeps penalties. A ban is for bytes that failed
 * verification or for sustained failure: `banAfter` failures in a row, over at least `sustainMs`, where each was of
 * a request started after the failure before (a burst of failures of requests in flight together is one failure:
 * one reset connection, one stall). Bans back off: the first for failures is short, each further ban in a row twice as long, up to
 * `banMs`. When a ban ends the peer is asked again (re-probed): an answer clears its record, one more failure
 * bans it again at once. A `busy` refusal is not a failure.
 */
export class PeerBook {
  private readonly peers = new Map<string, PeerState>()
  private readonly banAfter: number
  private readonly sustainMs: number
  private readonly banMs: number
  private readonly firstBanMs: number
  private readonly badBanMs: number
  private readonly burstMs: number

  constructor(init: PeerBookInit = {}) {
    this.banAfter = init.banAfter ?? 3
    this.sustainMs = init.sustainMs ?? 5_000
    this.banMs = init.banMs ?? 10 * 60_000
    this.firstBanMs = Math.min(init.firstBanMs ?? 10_000, this.banMs)
    this.badBanMs = Math.min(init.badBanMs ?? 60_000, this.banMs)
    this.burstMs = init.burstMs ?? 1_000
  }

  private state(peer: string): PeerState {
    let s = this.peers.get(peer)
    if (s === undefined) {
      s = {
        score: { peer, latencyMs: 50, throughput: 0, served: 0, failures: 0, bad: 0, busy: 0, bans: 0, bannedUntil: 0 },
        lastFailureAt: 0,
        firstFailureAt: 0,
        lastSuccessAt: 0,
        probation: false,
        busyUntil: 0
      }
      this.peers.set(peer, s)
    }
    return s
  }

  /** A request that returned `bytes` in `ms`. */
  success(peer: string, ms: number, bytes: number): void {
    const s = this.state(peer)
    const score = s.score
    score.latencyMs = score.served === 0 ? ms : 0.8 * score.latencyMs + 0.2 * ms
    if (bytes > 0 && ms > 0) {
      const rate = (bytes * 1000) / ms
      score.throughput = score.throughput === 0 ? rate : 0.8 * score.throughput + 0.2 * rate
    }
    score.served += bytes
    s.lastSuccessAt = Date.now()
    // An answer that was in flight when a ban began does not end the ban; it only clears the failures.
    score.failures = 0
    s.lastFailureAt = 0
    s.firstFailureAt = 0
    if (!this.isBanned(peer)) {
      score.bans = 0
      s.probation = false
    }
  }

  /** The peer sent part of an answer: it is alive (see answeredWithin), whatever becomes of the rest. */
  heard(peer: string): void {
    this.state(peer).lastSuccessAt = Date.now()
  }

  /**
   * A request that failed (timeout, broken stream, dial). `startedAt` (epoch ms) is when the request began: one
   * that began before the last failure that counted was in flight with it and is part of the same incident.
   * Without it, a failure within `burstMs` of the last one is.
   */
  failure(peer: string, startedAt?: number): void {
    const s = this.state(peer)
    const now = Date.now()
    if (s.lastFailureAt > 0 && (startedAt ?? now - this.burstMs) <= s.lastFailureAt) return
    s.lastFailureAt = now
    if (s.firstFailureAt === 0) s.firstFailureAt = now
    // Requests still in flight when the ban began fail into it: they are the incident that banned the peer.
    if (this.isBanned(peer)) return
    s.score.failures++
    const sustained = s.score.failures >= this.banAfter && now - s.firstFailureAt >= this.sustainMs
    if (s.probation || sustained) this.ban(s, this.firstBanMs)
  }

  /** Bytes from this peer failed verification. */
  bad(peer: string): void {
    const s = this.state(peer)
    s.score.bad++
    s.lastFailureAt = Date.now()
    // Verified bytes weigh more than any failure: a ban at least as long as the bad-bytes ladder says, now.
    this.ban(s, this.badBanMs, true)
  }

  /** The peer refused a request as busy: it is alive, so this is no failure, but others are asked first for a while. */
  busy(peer: string): void {
    const s = this.state(peer)
    s.score.busy++
    s.busyUntil = Date.now() + BUSY_MS
  }

  private ban(s: PeerState, firstMs: number, extend = false): void {
    const ms = Math.min(this.banMs, firstMs * 2 ** Math.min(s.score.bans, 30))
    const until = Date.now() + ms
    s.score.bannedUntil = extend ? Math.max(s.score.bannedUntil, until) : until
    s.score.bans++
    s.score.failures = 0
    s.firstFailureAt = 0
    s.probation = true
  }

  isBanned(peer: string): boolean {
    return (this.peers.get(peer)?.score.bannedUntil ?? 0) > Date.now()
  }

  /**
   * Peers not banned, best first: lowest expected cost (latency, plus a penalty per recent failure, and more while
   * the peer says it is busy).
   */
  rank(peers: Iterable<string>): string[] {
    const now = Date.now()
    const cost = (p: string) => {
      const s = this.peers.get(p)
      if (s === undefined) return 50
      return s.score.latencyMs * (1 + s.score.failures) * (s.busyUntil > now ? 4 : 1)
    }
    return [...new Set(peers)].filter((p) => !this.isBanned(p)).sort((a, b) => cost(a) - cost(b))
  }

  /**
   * Peers not banned that answered (a request, or part of one) in the last `ms`: members of the cluster even
   * while their connection is dialled again.
   */
  answeredWithin(ms: number): string[] {
    const since = Date.now() - ms
    return [...this.peers.values()]
      .filter((s) => s.lastSuccessAt > since && !this.isBanned(s.score.peer))
      .map((s) => s.score.peer)
  }

  latency(peer: string): number {
    return this.peers.get(peer)?.score.latencyMs ?? 50
  }

  snapshot(): PeerScore[] {
    return [...this.peers.values()].map((s) => ({ ...s.score }))
  }
}
