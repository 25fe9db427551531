import { connect, createServer, type Server } from 'node:net'
import { startWanProxy } from '@test/wan-proxy.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

/** A TCP service that answers every byte count it is sent with that many bytes. */
let server: Server
let target = ''

beforeAll(async () => {
  server = createServer((s) => {
    s.on('error', () => {})
    s.on('data', (d: Buffer) => s.write(Buffer.alloc(Number(d.toString()), 7)))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()))
  const addr = server.address()
  target = `127.0.0.1:${typeof addr === 'object' && addr !== null ? addr.port : 0}`
})

afterAll(async () => {
  await new Promise<void>((r) => server.close(() => r()))
})

/** Asks for `n` bytes through `host` and resolves once they all arrived, with the elapsed ms. */
function ask(host: string, n: number): Promise<number> {
  const [h, p] = host.split(':')
  return new Promise((resolve, reject) => {
    const started = performance.now()
    const s = connect(Number(p), h, () => s.write(String(n)))
    let got = 0
    s.on('data', (d: Buffer) => {
      got += d.length
      if (got >= n) {
        s.destroy()
        resolve(performance.now() - started)
      }
    })
    s.on('error', reject)
    s.on('close', () => reject(new Error(`connection closed after ${got} of ${n} bytes`)))
  })
}

describe('wan proxy', () => {
  it('adds the round-trip time, caps bandwidth and counts bytes each way', async () => {
    const direct = await ask(target, 10)
    const proxy = await startWanProxy({ target, rttMs: 60, bitsPerSecond: 4_000_000 })
    try {
      // Connect (one RTT through the proxy is not emulated: the proxy accepts locally) + request + reply.
      const small = await ask(proxy.host, 10)
      expect(small).toBeGreaterThanOrEqual(58)
      expect(small).toBeLessThan(direct + 1000)
      // 500 kB at 4 Mbit/s is 1 s on the wire.
      const big = await ask(proxy.host, 500_000)
      expect(big).toBeGreaterThanOrEqual(950)
      expect(big).toBeLessThan(6000)
      expect(proxy.bytesDown).toBe(500_010)
      expect(proxy.bytesUp).toBe('10'.length + '500000'.length)
      expect(proxy.connections).toBe(2)
      proxy.reset()
      expect(proxy.bytesDown).toBe(0)
    } finally {
      await proxy.stop()
    }
  })

  it('cut() drops open connections and keeps accepting new ones', async () => {
    const proxy = await startWanProxy({ target, rttMs: 0, bitsPerSecond: 1_000_000 })
    try {
      const slow = ask(proxy.host, 1_000_000)
      await new Promise((r) => setTimeout(r, 200))
      proxy.cut()
      await expect(slow).rejects.toThrow()
      expect(await ask(proxy.host, 10)).toBeGreaterThanOrEqual(0)
    } finally {
      await proxy.stop()
    }
  })
})
