import { chmod, mkdir, mkdtemp, rename, rm, unlink } from 'node:fs/promises'
import { createServer, type IncomingMessage, request, type ServerResponse } from 'node:http'
import { createConnection } from 'node:net'
import { basename, dirname, join } from 'node:path'
import { type PeerCredentials, peerCredentials } from '@strata/native'
import { type ControlErrorBody, ControlRemoteError, ControlSocketError, ControlUnavailableError } from './errors.js'
import type { StrataNode } from './node.js'

/**
 * The control API: HTTP + JSON on a Unix socket (mode 0660). A route answers with a JSON value, or with an
 * async iterable of events streamed as NDJSON (one JSON object a line; the last is the result or the error).
 */
export interface ControlRequest {
  body: unknown
  /**
   * Who is asking, as the kernel recorded it when the client connected (SO_PEERCRED): p2pd runs as root, and a
   * route that acts on the file system acts with the caller's rights, not its own.
   */
  caller: PeerCredentials
  /** The route pattern's match (capture groups for path parameters). */
  match: RegExpExecArray
  /** Aborted when the client goes away or the node stops. */
  signal: AbortSignal
}

export type RouteHandler = (req: ControlRequest) => Promise<unknown> | AsyncIterable<unknown>

export interface ControlServer {
  readonly socket: string
  /** Adds a route (e.g. `POST /mounts/...` from the fs package). Patterns match the whole path. */
  route(method: 'GET' | 'POST' | 'DELETE', pattern: RegExp, handler: RouteHandler): void
  close(): Promise<void>
}

const MAX_BODY = 1 << 20

function errorBody(err: unknown): ControlErrorBody {
  const e = err as { name?: unknown; code?: unknown; message?: unknown; hint?: unknown; cause?: unknown }
  const body: ControlErrorBody = { name: String(e?.name ?? 'Error'), message: String(e?.message ?? err) }
  if (typeof e?.code === 'string') body.code = e.code
  if (typeof e?.hint === 'string') body.hint = e.hint
  return body
}

async function readBody(req: IncomingMessage): Promise<unknown> {
  let size = 0
  const parts: Buffer[] = []
  for await (const part of req as AsyncIterable<Buffer>) {
    size += part.byteLength
    if (size > MAX_BODY) throw Object.assign(new Error('request body too large'), { status: 413 })
    parts.push(part)
  }
  if (size === 0) return undefined
  try {
    return JSON.parse(Buffer.concat(parts).toString('utf8'))
  } catch {
    throw Object.assign(new Error('request body is not JSON'), { name: 'BadRequest', status: 400 })
  }
}

function isIterable(v: unknown): v is AsyncIterable<unknown> {
  return typeof v === 'object' && v !== null && Symbol.asyncIterator in v
}

/** Is something answering on this socket already? */
function inUse(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = createConnection(path)
    c.once('connect', () => {
      c.destroy()
      resolve(true)
    })
    c.once('error', () => resolve(false))
  })
}

/** Serves the node's control API on a Unix socket. */
export async function startControlServer(node: StrataNode, options: { socket: string }): Promise<ControlServer> {
  const path = options.socket
  const routes: Array<{ method: string; pattern: RegExp; handler: RouteHandler }> = []
  const closing = new AbortController()
  const server = createServer((req, res) => void handle(req, res))

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://p2pd')
    const found = routes
      .map((r) => ({
        r,
        match: r.method === req.method ? new RegExp(`^${r.pattern.source}$`).exec(url.pathname) : null
      }))
      .find((x) => x.match !== null)
    const client = new AbortController()
    res.once('close', () => client.abort(new Error('control client went away')))
    const signal = AbortSignal.any([client.signal, closing.signal])
    try {
      if (found === undefined) {
        throw Object.assign(new Error(`no route ${req.method} ${url.pathname}`), { name: 'NotFound', status: 404 })
      }
      const caller = peerCredentials(req.socket)
      const body = await readBody(req)
      const answer = found.r.handler({ body, caller, match: found.match!, signal })
      if (isIterable(answer)) {
        res.writeHead(200, { 'content-type': 'application/x-ndjson' })
        try {
          for await (const event of answer) res.write(`${JSON.stringify(event)}\n`)
        } catch (err) {
          res.write(`${JSON.stringify({ type: 'error', error: errorBody(err) })}\n`)
        }
        res.end()
        return
      }
      const value = await answer
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify(value ?? {}))
    } catch (err) {
      const status = (err as { status?: number }).status ?? 500
      if (!res.headersSent) res.writeHead(status, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ error: errorBody(err) }))
    }
  }

  const control: ControlServer = {
    socket: path,
    route(method, pattern, handler) {
      routes.push({ method, pattern, handler })
    },
    async close() {
      closing.abort(new Error('p2pd is shutting down'))
      await new Promise<void>((resolve) => {
        server.close(() => resolve())
        server.closeIdleConnections()
      })
      // The server unlinks the name it was bound to (the staging one); the socket's own name goes here.
      await unlink(path).catch(() => {})
    }
  }
  addNodeRoutes(control, node)

  try {
    await mkdir(dirname(path), { recursive: true })
    if (await inUse(path)) {
      throw new ControlSocketError(path, {
        hint: 'another p2pd answers on this socket: stop it, or pass --socket PATH'
      })
    }
    // Bound in a directory only this process can enter, given its mode there, then renamed into place: the
    // socket is never reachable with the mode the umask gave it.
    const staging = await mkdtemp(join(dirname(path), `.${basename(path)}.`))
    try {
      const staged = join(staging, 'sock')
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(staged, () => resolve())
      })
      await chmod(staged, 0o660)
      await unlink(path).catch(() => {})
      await rename(staged, path)
    } finally {
      await rm(staging, { recursive: true, force: true })
    }
  } catch (err) {
    if ((err as Error).name === 'ControlSocketError') throw err
    throw new ControlSocketError(path, { cause: err })
  }
  return control
}

function addNodeRoutes(control: ControlServer, node: StrataNode): void {
  control.route('GET', /\/status/, ({ signal }) => node.status({ signal }))
  control.route('GET', /\/peers/, async () => node.peers())
  control.route('GET', /\/images/, ({ signal }) => node.images({ signal }))
  control.route('POST', /\/gc/, ({ signal }) => node.gc({ signal }))
  control.route('POST', /\/warm/, ({ body, signal }) => {
    const b = body as { image?: unknown; cluster?: unknown } | undefined
    if (typeof b?.image !== 'string' || b.image === '') {
      return Promise.reject(
        Object.assign(new Error('POST /warm needs {"image": "REF", "cluster": false}'), {
          name: 'BadRequest',
          status: 400
        })
      )
    }
    return warmEvents(node, b.image, b.cluster === true, signal)
  })
}

/** Progress events of a warm-up, then `{type: 'result'}` (or `{type: 'error'}` from the route). */
async function* warmEvents(node: StrataNode, image: string, cluster: boolean, signal: AbortSignal) {
  const events: unknown[] = []
  let wake: (() => void) | undefined
  let last = 0
  const push = (event: unknown, force = false) => {
    if (!force && Date.now() - last < 200) return
    last = Date.now()
    events.push(event)
    wake?.()
  }
  void (
    cluster
      ? node.warmCluster(image, { signal, onProgress: (p) => push({ type: 'progress', ...p }) })
      : node.warm(image, { signal, onProgress: (p) => push({ type: 'progress', ...p }) })
  ).then(
    (result) => push({ type: 'result', result }, true),
    (err: unknown) => push({ type: 'error', error: errorBody(err) }, true)
  )
  for (;;) {
    while (events.length > 0) {
      const event = events.shift() as { type: string }
      yield event
      if (event.type === 'result' || event.type === 'error') return
    }
    await new Promise<void>((resolve) => {
      wake = resolve
    })
    wake = undefined
  }
}

/** Talks to p2pd's control API (p2pctl, p2p-mount). */
export interface ControlClient {
  get<T>(path: string, options?: { signal?: AbortSignal }): Promise<T>
  post<T>(path: string, body?: unknown, options?: { signal?: AbortSignal }): Promise<T>
  /** A streaming route: each event as it comes; resolves with the last (`result`), rejects on an `error` event. */
  stream<T>(
    path: string,
    body: unknown,
    onEvent: (event: unknown) => void,
    options?: { signal?: AbortSignal }
  ): Promise<T>
}

export function createControlClient(socket: string, init: { timeoutMs?: number } = {}): ControlClient {
  const timeoutMs = init.timeoutMs ?? 30_000
  const call = (
    method: string,
    path: string,
    body: unknown,
    onLine: ((line: unknown) => void) | undefined,
    options?: { signal?: AbortSignal }
  ) =>
    new Promise<unknown>((resolve, reject) => {
      const signals = options?.signal !== undefined ? [options.signal] : []
      // A streaming call (warm-up) can run long; it has no overall timeout, only the caller's signal.
      if (onLine === undefined) signals.push(AbortSignal.timeout(timeoutMs))
      const payload = body === undefined ? undefined : JSON.stringify(body)
      const req = request(
        {
          socketPath: socket,
          path,
          method,
          headers: payload !== undefined ? { 'content-type': 'application/json' } : {},
          signal: AbortSignal.any(signals)
        },
        (res) => {
          let buffered = ''
          let last: unknown
          res.setEncoding('utf8')
          res.on('data', (text: string) => {
            buffered += text
            if (onLine === undefined || res.statusCode !== 200) return
            let nl = buffered.indexOf('\n')
            while (nl >= 0) {
              const line = buffered.slice(0, nl)
              buffered = buffered.slice(nl + 1)
              nl = buffered.indexOf('\n')
              if (line.trim() === '') continue
              last = JSON.parse(line)
              onLine(last)
            }
          })
          res.once('error', reject)
          res.once('end', () => {
            try {
              if (res.statusCode !== 200 || onLine === undefined) {
                const parsed = JSON.parse(buffered) as { error?: ControlErrorBody }
                if (parsed.error !== undefined) throw new ControlRemoteError(parsed.error)
                resolve(parsed)
                return
              }
              const event = last as { type?: string; error?: ControlErrorBody; result?: unknown } | undefined
              if (event?.type === 'error' && event.error !== undefined) throw new ControlRemoteError(event.error)
              if (event?.type !== 'result') throw new Error(`p2pd ended ${path} without a result`)
              resolve(event.result)
            } catch (err) {
              reject(err)
            }
          })
        }
      )
      req.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED' || err.code === 'EACCES') {
          reject(new ControlUnavailableError(socket, { cause: err }))
        } else reject(err)
      })
      req.end(payload)
    })
  return {
    get: (path, options) => call('GET', path, undefined, undefined, options) as Promise<never>,
    post: (path, body, options) => call('POST', path, body, undefined, options) as Promise<never>,
    stream: (path, body, onEvent, options) => call('POST', path, body, onEvent, options) as Promise<never>
  }
}
