import { createServer, type IncomingMessage, request, type ServerResponse } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'

/**
 * An HTTP proxy in front of a registry that sends the bodies of chosen answers a few bytes at a time: headers at
 * once, then `bytes` bytes every `everyMs` ms, so the client's idle timeout never fires. Everything else is
 * forwarded as it is.
 */
export interface TrickleProxy {
  /** `127.0.0.1:PORT`: use as the registry part of references. */
  host: string
  /** Which requests trickle (default: none); may be changed between requests. */
  match: (req: { method: string; path: string; range?: string }) => boolean
  bytes: number
  everyMs: number
  /** The trickled answers: path, body bytes sent so far, and whether the client hung up before the end. */
  readonly trickled: { path: string; sent: number; total: number; aborted: boolean }[]
  stop(): Promise<void>
}

export async function startTrickleProxy(
  target: string,
  options: { bytes?: number; everyMs?: number } = {}
): Promise<TrickleProxy> {
  const [targetHost, targetPort] = target.split(':') as [string, string]
  const sockets = new Set<Socket>()
  const timers = new Set<NodeJS.Timeout>()
  const proxy: TrickleProxy = {
    host: '',
    match: () => false,
    bytes: options.bytes ?? 1,
    everyMs: options.everyMs ?? 100,
    trickled: [],
    stop: async () => {}
  }

  const trickle = (res: ServerResponse, body: Buffer, path: string) => {
    const record = { path, sent: 0, total: body.length, aborted: false }
    proxy.trickled.push(record)
    const timer = setInterval(() => {
      const piece = body.subarray(record.sent, record.sent + proxy.bytes)
      record.sent += piece.length
      if (record.sent >= body.length) {
        clearInterval(timer)
        timers.delete(timer)
        res.end(piece)
      } else {
        res.write(piece)
      }
    }, proxy.everyMs)
    timers.add(timer)
    res.once('close', () => {
      clearInterval(timer)
      timers.delete(timer)
      if (record.sent < body.length) record.aborted = true
    })
  }

  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const path = req.url ?? '/'
    const range = typeof req.headers.range === 'string' ? { range: req.headers.range } : {}
    const slow = proxy.match({ method: req.method ?? '', path, ...range })
    const up = request(
      { host: targetHost, port: Number(targetPort), method: req.method, path, headers: req.headers },
      (upRes) => {
        if (!slow || req.method === 'HEAD') {
          res.writeHead(upRes.statusCode ?? 502, upRes.headers)
          upRes.pipe(res)
          return
        }
        const parts: Buffer[] = []
        upRes.on('data', (c: Buffer) => parts.push(c))
        upRes.on('end', () => {
          res.writeHead(upRes.statusCode ?? 502, upRes.headers)
          res.flushHeaders()
          trickle(res, Buffer.concat(parts), path)
        })
      }
    )
    up.on('error', () => res.socket?.destroy())
    req.pipe(up)
  })
  server.on('connection', (s) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  proxy.host = `127.0.0.1:${(server.address() as AddressInfo).port}`
  proxy.stop = async () => {
    for (const t of timers) clearInterval(t)
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return proxy
}
