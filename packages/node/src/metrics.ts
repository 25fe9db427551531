import { createServer, type Server } from 'node:http'
import { Counter, Gauge, Registry } from 'prom-client'
import type { StrataNode } from './node.js'

export interface MetricsServer {
  /** `host:port` it listens on. */
  readonly address: string
  close(): Promise<void>
}

/** The node's Prometheus metrics, read from the node on each scrape. */
export function nodeMetrics(node: StrataNode): Registry {
  const registry = new Registry()
  // One status read per scrape, shared by every metric's collect().
  let scrape: ReturnType<StrataNode['status']> | undefined
  const status = () => {
    scrape ??= node.status().finally(() => setTimeout(() => (scrape = undefined), 100).unref())
    return scrape
  }
  const bySource = () => node.fetcher.metrics().sources
  new Counter({
    name: 'strata_fetched_bytes_total',
    help: 'Chunk bytes fetched, by source (store = cache hit)',
    labelNames: ['source'],
    registers: [registry],
    collect() {
      this.reset()
      for (const [source, s] of Object.entries(bySource())) this.inc({ source }, s.bytes)
    }
  })
  new Counter({
    name: 'strata_fetch_requests_total',
    help: 'Chunk requests made, by source',
    labelNames: ['source'],
    registers: [registry],
    collect() {
      this.reset()
      for (const [source, s] of Object.entries(bySource())) this.inc({ source }, s.requests)
    }
  })
  new Counter({
    name: 'strata_verification_failures_total',
    help: 'Chunks whose bytes failed verification, by source',
    labelNames: ['source'],
    registers: [registry],
    collect() {
      this.reset()
      for (const [source, n] of Object.entries(node.fetcher.metrics().verificationFailures)) this.inc({ source }, n)
    }
  })
  new Counter({
    name: 'strata_served_bytes_total',
    help: 'Chunk bytes sent to peers',
    registers: [registry],
    async collect() {
      this.reset()
      this.inc((await status()).bytes.served)
    }
  })
  new Counter({
    name: 'strata_chunk_protocol_errors_total',
    help: 'Chunk protocol requests from peers that failed',
    registers: [registry],
    async collect() {
      this.reset()
      this.inc((await status()).requests.errors)
    }
  })
  new Gauge({
    name: 'strata_chunk_protocol_queued_bytes',
    help: 'Chunk bytes held for answers to peers not yet taken by their readers (bounded by maxQueuedBytes)',
    registers: [registry],
    async collect() {
      this.set((await status()).requests.queuedBytes)
    }
  })
  new Counter({
    name: 'strata_cache_hits_total',
    help: 'Chunk store hits',
    registers: [registry],
    async collect() {
      this.reset()
      this.inc((await status()).store.hits)
    }
  })
  new Counter({
    name: 'strata_cache_misses_total',
    help: 'Chunk store misses',
    registers: [registry],
    async collect() {
      this.reset()
      this.inc((await status()).store.misses)
    }
  })
  new Counter({
    name: 'strata_store_errors_total',
    help: 'Chunk store writes that failed (a full disk, an I/O error, no room beside pinned chunks under the cap)',
    registers: [registry],
    async collect() {
      this.reset()
      this.inc((await status()).store.writeErrors ?? 0)
    }
  })
  new Gauge({
    name: 'strata_store_bytes',
    help: 'Bytes held in the chunk store',
    registers: [registry],
    async collect() {
      this.set((await status()).store.bytes)
    }
  })
  new Gauge({
    name: 'strata_store_chunks',
    help: 'Chunks held in the chunk store',
    registers: [registry],
    async collect() {
      this.set((await status()).store.chunks)
    }
  })
  new Gauge({
    name: 'strata_peers',
    help: 'Connected peers',
    registers: [registry],
    async collect() {
      this.set((await status()).peers)
    }
  })
  new Gauge({
    name: 'strata_dht_provide_backlog',
    help: 'Keys waiting to be announced on the DHT',
    registers: [registry],
    async collect() {
      this.set((await status()).announce.backlog)
    }
  })
  return registry
}

/** Serves `GET /metrics` (Prometheus text) on `host:port`. */
export async function startMetricsServer(node: StrataNode, options: { listen: string }): Promise<MetricsServer> {
  const m = /^(.*):(\d+)$/.exec(options.listen)
  if (m === null) throw new TypeError(`metrics address '${options.listen}' is not HOST:PORT`)
  const host = m[1]!.replace(/^\[(.*)\]$/, '$1')
  const registry = nodeMetrics(node)
  const server: Server = createServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end('see /metrics\n')
      return
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: unknown) => res.writeHead(500).end(`${(err as Error).message}\n`)
    )
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(Number(m[2]), host, () => resolve())
  })
  const addr = server.address()
  const address = typeof addr === 'object' && addr !== null ? `${host}:${addr.port}` : options.listen
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve())
        server.closeAllConnections()
      })
  }
}
