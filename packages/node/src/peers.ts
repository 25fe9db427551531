/** What we have measured of one peer. */
export interface PeerScore {
  peer: string
  /** Smoothed round trip of a request, ms. */
  latencyMs: number
  /** Smoothed throughput, bytes/s. */
  throughput: number
  served: number
  failures: number
  bad: number
  /** Epoch ms until which the peer is not asked; 0 when not banned. */
  bannedUntil: number
}

export interface PeerBookInit {
  /** Failures in a row that ban a peer (a chunk that failed verification counts as this many at once). */
  banAfter?: number
  /** How long a ban lasts, ms. */
  banMs?: number
}

/**
 * Ranks peers by what we measured (latency, throughput) and keeps penalties: each failure costs, a chunk that
 * failed verification costs more, and repeated failures ban the peer for a while.
 */
export class PeerBook {
  private readonly scores = new Map<string, PeerScore>()
  private readonly banAfter: number
  private readonly banMs: number

  constructor(init: PeerBookInit = {}) {
    this.banAfter = init.banAfter ?? 3
    this.banMs = init.banMs ?? 10 * 60_000
  }

  private score(peer: string): PeerScore {
    let s = this.scores.get(peer)
    if (s === undefined) {
      s = { peer, latencyMs: 50, throughput: 0, served: 0, failures: 0, bad: 0, bannedUntil: 0 }
      this.scores.set(peer, s)
    }
    return s
  }

  /** A request that returned `bytes` in `ms`. */
  success(peer: string, ms: number, bytes: number): void {
    const s = this.score(peer)
    s.latencyMs = s.served === 0 ? ms : 0.8 * s.latencyMs + 0.2 * ms
    if (bytes > 0 && ms > 0) {
      const rate = (bytes * 1000) / ms
      s.throughput = s.throughput === 0 ? rate : 0.8 * s.throughput + 0.2 * rate
    }
    s.served += bytes
    s.failures = 0
  }

  /** A request that failed (timeout, refused, broken stream). */
  failure(peer: string): void {
    const s = this.score(peer)
    s.failures++
    if (s.failures >= this.banAfter) this.ban(s)
  }

  /** Bytes from this peer failed verification. */
  bad(peer: string): void {
    const s = this.score(peer)
    s.bad++
    s.failures += this.banAfter
    this.ban(s)
  }

  private ban(s: PeerScore): void {
    s.bannedUntil = Date.now() + this.banMs
    s.failures = 0
  }

  isBanned(peer: string): boolean {
    return (this.scores.get(peer)?.bannedUntil ?? 0) > Date.now()
  }

  /** Peers not banned, best first: lowest expected cost (latency, plus a penalty per recent failure). */
  rank(peers: Iterable<string>): string[] {
    const cost = (p: string) => {
      const s = this.scores.get(p)
      return s === undefined ? 50 : s.latencyMs * (1 + s.failures)
    }
    return [...new Set(peers)].filter((p) => !this.isBanned(p)).sort((a, b) => cost(a) - cost(b))
  }

  latency(peer: string): number {
    return this.scores.get(peer)?.latencyMs ?? 50
  }

  snapshot(): PeerScore[] {
    return [...this.scores.values()].map((s) => ({ ...s }))
  }
}
