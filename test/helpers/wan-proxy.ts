import { connect, createServer, type Socket } from 'node:net'

/**
 * A user-space TCP proxy that makes a loopback service look like it is across a WAN: every byte is delayed
 * by half the round-trip time in each direction, and each direction is a link of capped bandwidth shared by
 * all connections (a byte leaves when the link has sent the ones before it: a token bucket with a one-packet
 * burst). Counts bytes each way.
 */
export interface WanProxyOptions {
  /** Where to forward, e.g. the registry's `127.0.0.1:5000`. */
  target: string
  /** Added per round trip (half each way). Default 20 ms. */
  rttMs?: number
  /** Link bandwidth per direction in bits per second. Default 100 Mbit/s; 0 for unlimited. */
  bitsPerSecond?: number
  /** The address to listen on. Default 127.0.0.1. */
  listen?: string
}

export interface WanProxy {
  /** `127.0.0.1:PORT` (the `listen` address): use in place of the target. */
  host: string
  /** Client to target (requests). */
  readonly bytesUp: number
  /** Target to client (responses). */
  readonly bytesDown: number
  readonly connections: number
  /** Zeroes the counters. */
  reset(): void
  /** Drops every open connection (a network fault); new connections are accepted as before. */
  cut(): void
  stop(): Promise<void>
}

/** One direction of the emulated link. */
class Link {
  private freeAt = 0
  bytes = 0

  /** Forgets bytes still queued on the link (their connections are gone). */
  clear(): void {
    this.freeAt = 0
  }
  private readonly delayMs: number
  private readonly bytesPerMs: number

  constructor(delayMs: number, bytesPerMs: number) {
    this.delayMs = delayMs
    this.bytesPerMs = bytesPerMs
  }

  /** When `n` bytes handed over now arrive at the other end. */
  arrival(n: number): number {
    const now = performance.now()
    this.bytes += n
    if (this.bytesPerMs <= 0) return now + this.delayMs
    const start = Math.max(now, this.freeAt)
    this.freeAt = start + n / this.bytesPerMs
    return this.freeAt + this.delayMs
  }
}

/** Moves bytes from `from` to `to` through `link`, keeping order, pausing `from` while much is in flight. */
function pump(from: Socket, to: Socket, link: Link): void {
  const HIGH_WATER = 256 * 1024
  let queued = 0
  // One FIFO and one timer per direction: deliveries keep their order however late timers fire.
  const fifo: Array<{ when: number; deliver: () => void }> = []
  let timer: NodeJS.Timeout | undefined
  const drain = () => {
    timer = undefined
    const now = performance.now()
    while (fifo.length > 0 && fifo[0]!.when <= now) fifo.shift()!.deliver()
    if (fifo.length > 0) timer = setTimeout(drain, fifo[0]!.when - now)
  }
  const at = (when: number, deliver: () => void) => {
    fifo.push({ when: Math.max(when, fifo.at(-1)?.when ?? 0), deliver })
    if (timer === undefined) timer = setTimeout(drain, Math.max(0, fifo[0]!.when - performance.now()))
  }
  from.on('data', (data: Buffer) => {
    queued += data.length
    if (queued > HIGH_WATER) from.pause()
    at(link.arrival(data.length), () => {
      queued -= data.length
      if (!to.destroyed) to.write(data)
      if (queued <= HIGH_WATER && from.isPaused()) from.resume()
    })
  })
  from.on('end', () => at(performance.now(), () => to.end()))
  from.on('error', () => to.destroy())
  from.on('close', () => at(performance.now(), () => to.destroy()))
}

export async function startWanProxy(options: WanProxyOptions): Promise<WanProxy> {
  const rtt = options.rttMs ?? 20
  const bps = options.bitsPerSecond ?? 100_000_000
  const listen = options.listen ?? '127.0.0.1'
  const [targetHost, targetPort] = options.target.split(':')
  const up = new Link(rtt / 2, bps / 8 / 1000)
  const down = new Link(rtt / 2, bps / 8 / 1000)
  let connections = 0
  const sockets = new Set<Socket>()
  const server = createServer((client) => {
    connections++
    const upstream = connect(Number(targetPort), targetHost)
    for (const s of [client, upstream]) {
      s.setNoDelay(true)
      sockets.add(s)
      s.on('close', () => sockets.delete(s))
    }
    pump(client, upstream, up)
    pump(upstream, client, down)
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, listen, () => resolve())
  })
  const addr = server.address()
  const port = typeof addr === 'object' && addr !== null ? addr.port : 0
  return {
    host: `${listen}:${port}`,
    get bytesUp() {
      return up.bytes
    },
    get bytesDown() {
      return down.bytes
    },
    get connections() {
      return connections
    },
    reset() {
      up.bytes = 0
      down.bytes = 0
      connections = 0
    },
    cut() {
      for (const s of sockets) s.destroy()
      up.clear()
      down.clear()
    },
    async stop() {
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}
