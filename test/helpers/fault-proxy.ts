import { createServer, type IncomingMessage, request, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

/**
 * What a fault does to a matching request. Everything not matched is forwarded to the target unchanged.
 * - status: answer this status (and headers/body) without asking the target
 * - body: answer 200 with this body instead of the target's (wrong digest, malformed manifest, ...)
 * - truncate: forward, but close the connection after `bytes` bytes of the body
 * - ignoreRange: forward without the Range header, so the target answers 200 with the whole body
 * - delay: wait `ms` before forwarding (slow headers)
 * - stall: forward, send `afterBytes` bytes of the body, then send nothing more (slow body)
 * - corrupt: forward, with the byte at offset `at` of the body flipped (default: its middle, by Content-Length)
 * - redirect: answer 307 to `/_storage/...` on this proxy, which serves the same target URL without
 *   Authorization, like a signed blob-storage URL (put faults on path /_storage/ to expire it)
 */
export type FaultAction =
  | { kind: 'status'; status: number; headers?: Record<string, string>; body?: string }
  | { kind: 'body'; body: string | Uint8Array; headers?: Record<string, string> }
  | { kind: 'truncate'; bytes: number }
  | { kind: 'ignoreRange' }
  | { kind: 'delay'; ms: number }
  | { kind: 'stall'; afterBytes: number }
  | { kind: 'corrupt'; at?: number }
  | { kind: 'redirect' }

export type Fault = FaultAction & {
  /** Only requests with this method (default: any). */
  method?: string
  /** Only requests whose path (with query) matches (default: any). */
  path?: RegExp | string
  /** Let this many matching requests through before the fault starts (default 0). */
  skip?: number
  /** Apply to this many matching requests, then stop (default 1; Infinity for always). */
  times?: number
}

export interface ProxyRequest {
  method: string
  path: string
  range?: string
  /** The fault applied, if any. */
  fault?: FaultAction['kind']
}

export interface FaultProxy {
  /** `127.0.0.1:PORT`: use as the registry part of references. */
  host: string
  url: string
  /** Faults in match order; may be changed between requests. */
  faults: Fault[]
  /** Every request seen, in order. */
  requests: ProxyRequest[]
  stop(): Promise<void>
}

const STORAGE = '/_storage/'

/** An HTTP proxy in front of `target` (`host:port`) that injects faults into matching requests. */
export async function startFaultProxy(target: string, faults: Fault[] = []): Promise<FaultProxy> {
  const [targetHost, targetPort] = target.replace(/^https?:\/\//, '').split(':') as [string, string]
  const seen = new Map<Fault, { seen: number; applied: number }>()
  const requests: ProxyRequest[] = []
  const sockets = new Set<import('node:net').Socket>()
  const proxy: FaultProxy = { host: '', url: '', faults, requests, stop: async () => {} }

  const pick = (req: IncomingMessage): Fault | undefined => {
    for (const f of proxy.faults) {
      if (f.method !== undefined && f.method !== req.method) continue
      const p = f.path
      if (p !== undefined && !(typeof p === 'string' ? req.url?.includes(p) : p.test(req.url ?? ''))) continue
      const s = seen.get(f) ?? { seen: 0, applied: 0 }
      seen.set(f, s)
      s.seen++
      if (s.seen <= (f.skip ?? 0) || s.applied >= (f.times ?? 1)) continue
      s.applied++
      return f
    }
    return undefined
  }

  const forward = (
    req: IncomingMessage,
    res: ServerResponse,
    fault: Fault | undefined,
    path: string,
    dropAuth: boolean
  ) => {
    const headers = { ...req.headers }
    if (fault?.kind === 'ignoreRange') delete headers.range
    if (dropAuth) delete headers.authorization
    const up = request({ host: targetHost, port: Number(targetPort), method: req.method, path, headers }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers)
      if (fault?.kind === 'corrupt') {
        const at = fault.at ?? Math.floor(Number(upRes.headers['content-length'] ?? 0) / 2)
        let seen = 0
        upRes.on('data', (chunk: Buffer) => {
          let part = chunk
          if (at >= seen && at < seen + chunk.length) {
            part = Buffer.from(chunk)
            part[at - seen] = (part[at - seen] ?? 0) ^ 0xff
          }
          seen += chunk.length
          res.write(part)
        })
        upRes.on('end', () => res.end())
        return
      }
      if (fault?.kind !== 'truncate' && fault?.kind !== 'stall') {
        upRes.pipe(res)
        return
      }
      const limit = fault.kind === 'truncate' ? fault.bytes : fault.afterBytes
      let sent = 0
      upRes.on('data', (chunk: Buffer) => {
        if (sent >= limit) return
        const part = chunk.subarray(0, limit - sent)
        sent += part.length
        const full = sent >= limit
        if (full) upRes.destroy()
        // Close only once the bytes are on the wire, so the client sees headers and a short body.
        res.write(part, () => {
          if (full && fault.kind === 'truncate') res.socket?.destroy()
        })
      })
      upRes.on('end', () => {
        if (sent < limit) res.end()
      })
    })
    up.on('error', () => res.socket?.destroy())
    req.pipe(up)
  }

  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const fault = pick(req)
    const entry: ProxyRequest = { method: req.method ?? '', path: req.url ?? '' }
    if (typeof req.headers.range === 'string') entry.range = req.headers.range
    if (fault !== undefined) entry.fault = fault.kind
    requests.push(entry)
    const storage = req.url?.startsWith(STORAGE) === true
    const path = storage ? Buffer.from(req.url!.slice(STORAGE.length), 'base64url').toString('utf8') : (req.url ?? '/')
    switch (fault?.kind) {
      case 'status':
        req.resume()
        res.writeHead(fault.status, fault.headers)
        res.end(fault.body ?? '')
        return
      case 'body':
        req.resume()
        res.writeHead(200, { 'content-length': String(Buffer.byteLength(fault.body)), ...fault.headers })
        res.end(fault.body)
        return
      case 'redirect':
        req.resume()
        res.writeHead(307, { location: `${proxy.url}${STORAGE}${Buffer.from(path).toString('base64url')}` })
        res.end()
        return
      case 'delay':
        setTimeout(() => forward(req, res, fault, path, storage), fault.ms)
        return
      default:
        forward(req, res, fault, path, storage)
    }
  })
  server.on('connection', (s) => {
    sockets.add(s)
    s.once('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  proxy.host = `127.0.0.1:${port}`
  // The redirect target uses `localhost` so clients see another host, as with real blob storage.
  proxy.url = `http://localhost:${port}`
  proxy.stop = async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return proxy
}
