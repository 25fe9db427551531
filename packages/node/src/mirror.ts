// The pull-through mirror: the OCI distribution pull API on a local port, for runtimes that cannot change their
// snapshotter (stock containerd, podman, Docker). It moves whole compressed blobs, not chunks: P2P but not lazy.
//
// A blob is kept in the chunk store as 4 MiB pieces (each a chunk named by its own sha256, evictable under the
// cache cap like any chunk) plus an index in the store's metadata. It comes from the store, else from a peer
// that holds it, else from its home node (which reads the registry once for the cluster), else from the registry
// itself, and it is checked against its digest before the response starts: a runtime never sees a wrong byte.
// A tag is resolved upstream at every request; when the registry cannot be reached, the manifest it named last.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { PeerId, Stream } from '@libp2p/interface'
import { type AbortOptions, digestHasher, isSha256Digest, META, StrataError, sha256Digest } from '@strata/base'
import { isRegistryOutage } from '@strata/fetcher'
import { parseReference, type RegistryClient } from '@strata/registry'
import type { ChunkStore } from '@strata/store'
import { ProtocolError } from './errors.js'
import { encodeFrame, flushed, readFrames } from './frames.js'
import type { ByteBudget } from './protocol.js'

export const BLOB_PROTOCOL = '/strata/blob/1.0.0'

/** Piece size of a blob in the store; also the largest frame of the blob protocol's data. */
const PIECE = 4 << 20
/** Peers asked for a blob before its home and the registry. */
const MAX_HOLDERS_ASKED = 4

interface BlobIndex {
  size: number
  pieces: string[]
}

export interface MirrorComponents {
  store: ChunkStore
  /** The node-wide bound on bytes sent to peers and not yet read by them (the chunk protocol's too). */
  queued: ByteBudget
  registry: RegistryClient
  /** Peers that may hold `digest` (DHT providers, then connected peers), best first, banned ones left out. */
  holders(digest: string, options?: AbortOptions): Promise<string[]>
  /** The blob's home in the cluster, or undefined when it is this node. */
  home(digest: string): string | undefined
  openStream(peer: string, protocol: string, options?: AbortOptions): Promise<Stream>
  /** A peer sent bytes that do not match the digest / failed otherwise. */
  onBadPeer(peer: string): void
  onPeerFailure(peer: string): void
  /** Whether a peer may have this node read `ref`'s registry (see the node's registry rule). */
  mayReadForPeer(ref: string): boolean
  /** A local runtime asked for `registry`: peers may name it from now on. */
  allowRegistry(registry: string): void
  log?: (message: string) => void
}

export interface MirrorStats {
  /** Blob bytes served to runtimes, by where they came from. */
  served: number
  fetched: { store: number; peer: number; home: number; registry: number }
  badPeers: number
}

/** A blob the mirror could not get from anywhere: the runtime is told 404 and goes upstream. */
export class BlobUnavailableError extends StrataError {
  override name = 'BlobUnavailableError'
  override readonly code = 'ERR_BLOB_UNAVAILABLE'
}

export class Mirror {
  private readonly flights = new Map<string, Promise<BlobIndex>>()
  readonly stats: MirrorStats = { served: 0, fetched: { store: 0, peer: 0, home: 0, registry: 0 }, badPeers: 0 }

  constructor(private readonly c: MirrorComponents) {}

  /** The index of a blob held whole in the store, or undefined. */
  async held(digest: string, options?: AbortOptions): Promise<BlobIndex | undefined> {
    const raw = await this.c.store.getMeta(META.mirrorBlob(digest), options)
    if (raw === undefined) return undefined
    const index = JSON.parse(new TextDecoder().decode(raw)) as BlobIndex
    for (const p of index.pieces) if (!(await this.c.store.has(p, options))) return undefined
    return index
  }

  /**
   * Gets the blob into the store (one flight per digest), from the first source that has it, checked against
   * the digest: a peer's bad bytes count against it and the next source is asked.
   */
  obtain(digest: string, ref: string, via: 'local' | 'peer', options?: AbortOptions): Promise<BlobIndex> {
    let flight = this.flights.get(digest)
    if (flight === undefined) {
      flight = this.fetchBlob(digest, ref, via, options).finally(() => this.flights.delete(digest))
      this.flights.set(digest, flight)
    }
    return flight
  }

  private async fetchBlob(digest: string, ref: string, via: 'local' | 'peer', options?: AbortOptions) {
    if (via === 'local') this.c.allowRegistry(parseReference(ref).registry)
    const held = await this.held(digest, options)
    if (held !== undefined) {
      this.stats.fetched.store += held.size
      return held
    }
    const tried: string[] = []
    const fromPeer = async (peer: string, op: 'get' | 'fetch', kind: 'peer' | 'home') => {
      try {
        const index = await this.ingest(digest, this.askPeer(peer, op, digest, ref, options), options)
        if (index !== undefined) this.stats.fetched[kind] += index.size
        return index
      } catch (err) {
        if ((err as Error).name === 'BlobDigestMismatch') {
          this.stats.badPeers++
          this.c.onBadPeer(peer)
          this.c.log?.(`mirror: peer ${peer} sent a wrong ${digest}: dropped it, asking elsewhere`)
        } else {
          this.c.onPeerFailure(peer)
          this.c.log?.(`mirror: peer ${peer} could not give ${digest}: ${(err as Error).message}`)
        }
        tried.push(`${peer}: ${(err as Error).message}`)
        return undefined
      }
    }
    for (const peer of (await this.c.holders(digest, options)).slice(0, MAX_HOLDERS_ASKED)) {
      const index = await fromPeer(peer, 'get', 'peer')
      if (index !== undefined) return index
    }
    // A forwarded request is this node's to fetch: it is the home (as the asker sees the cluster).
    const home = via === 'local' ? this.c.home(digest) : undefined
    if (home !== undefined) {
      const index = await fromPeer(home, 'fetch', 'home')
      if (index !== undefined) return index
    }
    try {
      const index = await this.ingest(digest, this.fromRegistry(digest, ref, options), options)
      if (index === undefined) throw new BlobUnavailableError(`the registry has no ${digest}`)
      this.stats.fetched.registry += index.size
      return index
    } catch (err) {
      tried.push(`registry: ${(err as Error).message}`)
      throw new BlobUnavailableError(`cannot get ${digest} of ${ref}: ${tried.join('; ')}`, { cause: err })
    }
  }

  /**
   * Stores what `source` yields as pieces while hashing it whole; on a digest mismatch the pieces go again and
   * BlobDigestMismatch is thrown. Undefined when the source does not have the blob.
   */
  private async ingest(
    digest: string,
    source: AsyncIterable<Uint8Array | 'missing'>,
    options?: AbortOptions
  ): Promise<BlobIndex | undefined> {
    const whole = digestHasher()
    const pieces: string[] = []
    let size = 0
    let piece: Uint8Array[] = []
    let pieceBytes = 0
    const putPiece = async () => {
      const bytes = Buffer.concat(piece)
      piece = []
      pieceBytes = 0
      const d = sha256Digest(bytes)
      await this.c.store.put(d, bytes, { layer: digest, ...options })
      pieces.push(d)
    }
    try {
      for await (const data of source) {
        if (data === 'missing') return undefined
        whole.update(data)
        size += data.byteLength
        for (let at = 0; at < data.byteLength; ) {
          const n = Math.min(PIECE - pieceBytes, data.byteLength - at)
          piece.push(data.subarray(at, at + n))
          pieceBytes += n
          at += n
          if (pieceBytes === PIECE) await putPiece()
        }
      }
      if (pieceBytes > 0 || pieces.length === 0) await putPiece()
      if (whole.digest() !== digest) {
        throw Object.assign(new Error(`the bytes received are not ${digest}`), { name: 'BlobDigestMismatch' })
      }
    } catch (err) {
      // Pieces shared with another blob stay: they were checked by their own digest, but may belong to a lie.
      for (const p of pieces) await this.c.store.delete(p).catch(() => {})
      throw err
    }
    const index = { size, pieces }
    await this.c.store.putMeta(META.mirrorBlob(digest), new TextEncoder().encode(JSON.stringify(index)), options)
    return index
  }

  private async *askPeer(
    peer: string,
    op: 'get' | 'fetch',
    digest: string,
    ref: string,
    options?: AbortOptions
  ): AsyncGenerator<Uint8Array | 'missing'> {
    const stream = await this.c.openStream(peer, BLOB_PROTOCOL, options)
    try {
      stream.send(encodeFrame(new TextEncoder().encode(JSON.stringify({ op, digest, ref }))))
      await stream.close(options)
      let first = true
      let size = 0
      let got = 0
      for await (const frame of readFrames(stream, PIECE + 1)) {
        if (first) {
          first = false
          const head = JSON.parse(new TextDecoder().decode(frame)) as { size?: number; missing?: boolean }
          if (head.missing === true) {
            yield 'missing'
            return
          }
          if (!Number.isSafeInteger(head.size) || head.size! < 0)
            throw new ProtocolError(`peer ${peer}: bad blob header`)
          size = head.size!
          continue
        }
        got += frame.byteLength
        if (got > size) throw new ProtocolError(`peer ${peer} sent more than the ${size} bytes of ${digest}`)
        yield frame
      }
      if (first || got !== size) throw new ProtocolError(`peer ${peer} ended ${digest} after ${got} of ${size} bytes`)
    } catch (err) {
      stream.abort(err as Error)
      throw err
    }
  }

  private async *fromRegistry(digest: string, ref: string, options?: AbortOptions): AsyncGenerator<Uint8Array> {
    const target = `${parseReference(ref).registry}/${parseReference(ref).repository}`
    const size = await this.c.registry.blobSize(target, digest, options)
    const blob = this.c.registry.blob(target, digest, size)
    for (let at = 0; at < size; at += PIECE) {
      yield await blob.readAt(at, Math.min(PIECE, size - at), options)
    }
  }

  /** The blob's bytes from `offset` to `end` (exclusive), piece by piece from the store. */
  async *read(index: BlobIndex, offset: number, end: number, options?: AbortOptions): AsyncGenerator<Uint8Array> {
    for (let i = Math.floor(offset / PIECE); i * PIECE < end; i++) {
      const bytes = await this.c.store.get(index.pieces[i]!, options)
      if (bytes === undefined) throw new BlobUnavailableError(`a piece of the blob left the store while it was read`)
      const from = Math.max(0, offset - i * PIECE)
      const to = Math.min(bytes.byteLength, end - i * PIECE)
      yield bytes.subarray(from, to)
    }
  }

  /** Serves one blob-protocol request from a peer: what this node holds (get), or fetches as the home (fetch). */
  async serve(stream: Stream, from: PeerId): Promise<void> {
    const signal = AbortSignal.timeout(120_000)
    try {
      let request: { op?: unknown; digest?: unknown; ref?: unknown } | undefined
      for await (const frame of readFrames(stream, 64 * 1024)) {
        request = JSON.parse(new TextDecoder().decode(frame)) as typeof request
        break
      }
      const { op, digest, ref } = request ?? {}
      if ((op !== 'get' && op !== 'fetch') || typeof digest !== 'string' || !isSha256Digest(digest)) {
        throw new ProtocolError(`bad blob request from ${from.toString()}`)
      }
      let index = await this.held(digest, { signal })
      if (index === undefined && op === 'fetch' && typeof ref === 'string' && this.c.mayReadForPeer(ref)) {
        index = await this.obtain(digest, ref, 'peer', { signal }).catch(() => undefined)
      }
      const send = async (bytes: Uint8Array) => {
        stream.send(encodeFrame(bytes))
        await flushed(stream, signal)
      }
      if (index === undefined) {
        await send(new TextEncoder().encode(JSON.stringify({ missing: true })))
      } else {
        await send(new TextEncoder().encode(JSON.stringify({ size: index.size })))
        // Piece by piece within the node's bound: a peer that does not read holds one piece of it at most.
        for (let at = 0; at < index.size; at += PIECE) {
          const n = Math.min(PIECE, index.size - at)
          await this.c.queued.take(n, signal)
          try {
            for await (const bytes of this.read(index, at, at + n, { signal })) await send(bytes)
          } finally {
            this.c.queued.give(n)
          }
        }
      }
      await stream.close({ signal })
    } catch (err) {
      stream.abort(err as Error)
    }
  }

  /** The manifest `ref` names now, upstream; the one it named last when the registry cannot be reached. */
  async manifest(
    ref: string,
    options?: AbortOptions
  ): Promise<{ digest: string; mediaType: string; bytes: Uint8Array; stale?: string }> {
    this.c.allowRegistry(parseReference(ref).registry)
    try {
      const m = await this.c.registry.getManifest(ref, options)
      const record = { digest: m.digest, mediaType: m.mediaType, bytes: Buffer.from(m.bytes).toString('base64') }
      await this.c.store
        .putMeta(META.mirrorManifest(ref), new TextEncoder().encode(JSON.stringify(record)), options)
        .catch(() => {})
      return { digest: m.digest, mediaType: m.mediaType, bytes: m.bytes }
    } catch (err) {
      if (!isRegistryOutage(err)) throw err
      const raw = await this.c.store.getMeta(META.mirrorManifest(ref), options).catch(() => undefined)
      if (raw === undefined) throw err
      const record = JSON.parse(new TextDecoder().decode(raw)) as { digest: string; mediaType: string; bytes: string }
      const bytes = new Uint8Array(Buffer.from(record.bytes, 'base64'))
      if (sha256Digest(bytes) !== record.digest) throw err
      return { ...record, bytes, stale: (err as Error).message }
    }
  }
}

export interface MirrorServer {
  readonly address: string
  close(): Promise<void>
}

/**
 * The distribution pull API: `GET /v2/`, HEAD and GET of `/v2/NAME/manifests/REF` and `/v2/NAME/blobs/DIGEST`
 * (with Range), the registry named by `?ns=HOST` (containerd, podman) or Docker Hub. What it cannot serve gets
 * a 404, so the runtime goes on to the registry itself.
 */
export async function startMirrorServer(mirror: Mirror, options: { listen: string }): Promise<MirrorServer> {
  const colon = options.listen.lastIndexOf(':')
  const host = options.listen.slice(0, colon)
  const port = Number(options.listen.slice(colon + 1))
  const server: Server = createServer((req, res) => void answer(mirror, req, res))
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => resolve())
  })
  const a = server.address() as AddressInfo
  return {
    address: `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve())
        server.closeAllConnections()
      })
  }
}

const ROUTE = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/

async function answer(mirror: Mirror, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://mirror')
  const head = req.method === 'HEAD'
  const fail = (status: number, code: string, message: string) => {
    if (res.headersSent) return void res.destroy()
    res.writeHead(status, { 'content-type': 'application/json' })
    res.end(head ? undefined : JSON.stringify({ errors: [{ code, message }] }))
  }
  if (req.method !== 'GET' && !head) return fail(405, 'UNSUPPORTED', 'the mirror serves pulls only')
  if (url.pathname === '/v2/' || url.pathname === '/v2') {
    res.writeHead(200, { 'content-type': 'application/json', 'docker-distribution-api-version': 'registry/2.0' })
    return void res.end(head ? undefined : '{}')
  }
  const m = ROUTE.exec(url.pathname)
  if (m === null) return fail(404, 'NAME_UNKNOWN', 'not a pull route')
  const [, name, kind, reference] = m as unknown as [string, string, string, string]
  const registry = url.searchParams.get('ns') ?? 'docker.io'
  const ref = isSha256Digest(reference) ? `${registry}/${name}@${reference}` : `${registry}/${name}:${reference}`
  const signal = AbortSignal.timeout(10 * 60_000)
  try {
    parseReference(ref)
  } catch (err) {
    return fail(404, 'NAME_INVALID', (err as Error).message)
  }
  try {
    if (kind === 'manifests') {
      const got = await mirror.manifest(ref, { signal })
      res.writeHead(200, {
        'content-type': got.mediaType,
        'content-length': String(got.bytes.byteLength),
        'docker-content-digest': got.digest
      })
      return void res.end(head ? undefined : got.bytes)
    }
    if (!isSha256Digest(reference)) return fail(404, 'DIGEST_INVALID', 'blobs are named by sha256 digest')
    const index = await mirror.obtain(reference, ref, 'local', { signal })
    const range = parseRange(req.headers.range, index.size)
    if (range === 'unsatisfiable') {
      res.writeHead(416, { 'content-range': `bytes */${index.size}` })
      return void res.end()
    }
    const [start, end] = range ?? [0, index.size]
    res.writeHead(range === undefined ? 200 : 206, {
      'content-type': 'application/octet-stream',
      'content-length': String(end - start),
      'docker-content-digest': reference,
      'accept-ranges': 'bytes',
      ...(range !== undefined && { 'content-range': `bytes ${start}-${end - 1}/${index.size}` })
    })
    if (head) return void res.end()
    for await (const bytes of mirror.read(index, start, end, { signal })) {
      if (res.destroyed) return
      if (!res.write(bytes)) {
        await new Promise((resolve) => {
          res.once('drain', resolve)
          res.once('close', resolve)
        })
      }
      mirror.stats.served += bytes.byteLength
    }
    res.end()
  } catch (err) {
    fail(404, kind === 'manifests' ? 'MANIFEST_UNKNOWN' : 'BLOB_UNKNOWN', (err as Error).message)
  }
}

/** `bytes=A-B`, `bytes=A-`, `bytes=-N` of a body of `size` bytes, as [start, end); undefined when absent. */
function parseRange(header: string | undefined, size: number): [number, number] | 'unsatisfiable' | undefined {
  if (header === undefined) return undefined
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim())
  if (m === null || (m[1] === '' && m[2] === '')) return undefined
  let start: number
  let end: number
  if (m[1] === '') {
    start = Math.max(0, size - Number(m[2]))
    end = size
  } else {
    start = Number(m[1])
    end = m[2] === '' ? size : Math.min(size, Number(m[2]) + 1)
  }
  return start >= size || start >= end ? 'unsatisfiable' : [start, end]
}
