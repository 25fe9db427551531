import type { FetcherMetrics } from './types.js'

/** Upper bounds (ms) of the latency buckets; the last bucket is +Inf. */
const BUCKETS_MS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, Number.POSITIVE_INFINITY]

interface Histogram {
  counts: number[]
  count: number
  sumMs: number
}

/** The fetcher's counters. Mutated in place; `snapshot()` copies. */
export class Metrics {
  private readonly sources = new Map<
    string,
    { requests: number; chunks: number; bytes: number; misses: number; errors: number }
  >()
  private readonly failures = new Map<string, number>()
  private readonly latency = new Map<string, Histogram>()
  singleFlightJoins = 0
  hedges = 0

  source(name: string): { requests: number; chunks: number; bytes: number; misses: number; errors: number } {
    let s = this.sources.get(name)
    if (s === undefined) {
      s = { requests: 0, chunks: 0, bytes: 0, misses: 0, errors: 0 }
      this.sources.set(name, s)
    }
    return s
  }

  verificationFailure(source: string): void {
    this.failures.set(source, (this.failures.get(source) ?? 0) + 1)
  }

  observe(source: string, ms: number): void {
    let h = this.latency.get(source)
    if (h === undefined) {
      h = { counts: BUCKETS_MS.map(() => 0), count: 0, sumMs: 0 }
      this.latency.set(source, h)
    }
    const i = BUCKETS_MS.findIndex((le) => ms <= le)
    h.counts[i] = (h.counts[i] ?? 0) + 1
    h.count++
    h.sumMs += ms
  }

  snapshot(): FetcherMetrics {
    return {
      sources: Object.fromEntries([...this.sources].map(([k, v]) => [k, { ...v }])),
      verificationFailures: Object.fromEntries(this.failures),
      singleFlightJoins: this.singleFlightJoins,
      hedges: this.hedges,
      latencyMs: Object.fromEntries(
        [...this.latency].map(([k, h]) => [
          k,
          {
            // Cumulative, as Prometheus histograms are.
            buckets: BUCKETS_MS.map((le, i) => ({ le, count: h.counts.slice(0, i + 1).reduce((a, b) => a + b, 0) })),
            count: h.count,
            sumMs: h.sumMs
          }
        ])
      )
    }
  }
}
