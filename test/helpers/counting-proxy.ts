import { createServer, request } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'

/** One request that went through the proxy, with the body bytes the registry sent back. */
export interface CountedRequest {
  method: string
  path: string
  /** First byte asked for by a Range header; undefined without one. */
  rangeStart?: number
  /** Last byte asked for by a Range header (inclusive); undefined without one or when open-ended. */
  rangeEnd?: number
  status: number
  bytes: number
}

export interface CountingProxy {
  /** `127.0.0.1:PORT`: use as the registry part of references. */
  host: string
  requests: CountedRequest[]
  /** Body bytes of blob GETs (optionally only those matching `filter`). */
  blobBytes(filter?: (r: CountedRequest) => boolean): number
  stop(): Promise<void>
}

/** An HTTP proxy in front of a registry that counts what the registry serves (egress), per request. */
export async function startCountingProxy(target: string): Promise<CountingProxy> {
  const [targetHost, targetPort] = target.split(':') as [string, string]
  const requests: CountedRequest[] = []
  const sockets = new Set<Socket>()
  const server = createServer((req, res) => {
    const range = /^bytes=(\d+)-(\d*)/.exec(req.headers.range ?? '')
    const entry: CountedRequest = { method: req.method ?? '', path: req.url ?? '', status: 0, bytes: 0 }
    if (range !== null) entry.rangeStart = Number(range[1])
    if (range !== null && range[2] !== '') entry.rangeEnd = Number(range[2])
    requests.push(entry)
    const up = request(
      { host: targetHost, port: Number(targetPort), method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        entry.status = upRes.statusCode ?? 0
        res.writeHead(upRes.statusCode ?? 502, upRes.headers)
        upRes.on('data', (chunk: Buffer) => {
          entry.bytes += chunk.byteLength
        })
        upRes.pipe(res)
      }
    )
    up.on('error', () => res.socket?.destroy())
    req.pipe(up)
  })
  server.on('connection', (s) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()))
  const port = (server.address() as AddressInfo).port
  return {
    host: `127.0.0.1:${port}`,
    requests,
    blobBytes: (filter) =>
      requests
        .filter((r) => r.method === 'GET' && r.path.includes('/blobs/') && (filter?.(r) ?? true))
        .reduce((n, r) => n + r.bytes, 0),
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        server.close(() => resolve())
      })
  }
}
