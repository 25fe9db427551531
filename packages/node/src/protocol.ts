import type { Stream } from '@libp2p/interface'
import { type AbortOptions, isSha256Digest } from '@strata/base'
import type { ChunkRef } from '@strata/fetcher'
import type { ChunkStore } from '@strata/store'
import { chunkFromWire, chunkToWire, repositoryOfRequest } from './chunk-wire.js'
import { PeerRefusedError, PeerTimeoutError, ProtocolError } from './errors.js'
import { encodeFrame, flushed, readFrames } from './frames.js'

/**
 * The chunk exchange protocol. One request per stream: the asker sends one JSON frame and closes its
 * writing side; the server answers with frames and closes.
 *
 *   request   {"op":"have","digests":[...]}        which of these do you hold?
 *             {"op":"get","digests":[...]}         send those you hold
 *             {"op":"fetch","chunks":[WireChunk],"ref":IMAGE}  send these, fetching what you lack (you are
 *                                                  their home; each chunk names its repository, IMAGE too
 *                                                  for older nodes: see chunk-wire.ts)
 *   answer    HAVE    [0x03][bitmap, bit i = digests[i] held]
 *             CHUNK   [0x01][u32 index][uncompressed bytes]  (unverified: the asker's fetcher checks them)
 *             MISSING [0x02][u32 index]
 *             ERROR   [0x04][JSON {reason, message}]         reason: busy | too-large | bad-request | internal
 */
export const CHUNK_PROTOCOL = '/strata/chunk/1.0.0'

const CHUNK = 0x01
const MISSING = 0x02
const HAVE = 0x03
const ERROR = 0x04

export interface ProtocolLimits {
  /** Largest request frame in bytes. */
  maxRequestBytes: number
  /** Most digests (or chunks) in one request. */
  maxDigestsPerRequest: number
  /** Most chunk bytes in one answer; the server marks the rest missing. */
  maxResponseBytes: number
  /** Largest single chunk. */
  maxChunkBytes: number
  /** Requests one peer may have in flight at this server; more are refused as busy. */
  maxInflightPerPeer: number
  /**
   * Chunk bytes this server holds at once for answers not yet taken by their readers, over all peers and
   * streams (identities cost nothing without a PSK, so a cap per peer would bound nothing). A reader that does
   * not read keeps its share until its request times out; other answers wait for room meanwhile.
   */
  maxQueuedBytes: number
  /** How long one request may take, either side. */
  requestTimeoutMs: number
}

export const DEFAULT_LIMITS: ProtocolLimits = {
  maxRequestBytes: 1 << 20,
  maxDigestsPerRequest: 4096,
  maxResponseBytes: 64 << 20,
  maxChunkBytes: 16 << 20,
  maxInflightPerPeer: 16,
  maxQueuedBytes: 64 << 20,
  requestTimeoutMs: 30_000
}

export type ChunkRequest =
  | { op: 'have'; digests: string[] }
  | { op: 'get'; digests: string[] }
  | { op: 'fetch'; chunks: ChunkRef[]; ref?: string }

export type ChunkAnswer = { index: number; bytes: Uint8Array } | { index: number; bytes: undefined }

export interface ServerComponents {
  store: ChunkStore
  /** The node-wide bound on bytes of answers not yet read (shared with the blob protocol); default its own. */
  queued?: ByteBudget
  /**
   * Gets chunks this node is the home of into its store, from wherever the node's fetcher finds them (for
   * `fetch`): one promise per chunk, settled as that chunk lands (true) or could not be got (false). `ref` names
   * the image the chunks come from.
   */
  fetch?: (chunks: ChunkRef[], ref: string | undefined, options?: AbortOptions) => Promise<Array<Promise<boolean>>>
  /** Told about each chunk served. */
  onServed?: (peer: string, bytes: number) => void
  /** Told about each failed request. */
  onError?: (peer: string, err: Error) => void
}

/** Serves chunk requests from the local store (and, for `fetch`, through the node's fetcher). */
export class ChunkServer {
  private readonly inflight = new Map<string, number>()
  private readonly closing = new AbortController()
  private readonly queued: ByteBudget

  constructor(
    private readonly components: ServerComponents,
    private readonly limits: ProtocolLimits = DEFAULT_LIMITS
  ) {
    this.queued = components.queued ?? new ByteBudget(limits.maxQueuedBytes)
  }

  /** Chunk bytes held now for answers their readers have not taken (at most limits.maxQueuedBytes). */
  queuedBytes(): number {
    return this.queued.used()
  }

  /** Stops taking requests and aborts those in flight. */
  stop(): void {
    this.closing.abort(new Error('node is shutting down'))
  }

  async handle(stream: Stream, peer: string): Promise<void> {
    // A request ends with its stream too: an asker that resets it frees what its answer was waiting for.
    const gone = new AbortController()
    const onClose = () => gone.abort(new Error(`the stream from ${peer} closed`))
    stream.addEventListener('close', onClose, { once: true })
    const signal = AbortSignal.any([
      AbortSignal.timeout(this.limits.requestTimeoutMs),
      this.closing.signal,
      gone.signal
    ])
    const onAbort = () => stream.abort(new PeerTimeoutError(`request from ${peer} timed out or was cancelled`))
    signal.addEventListener('abort', onAbort, { once: true })
    const count = this.inflight.get(peer) ?? 0
    this.inflight.set(peer, count + 1)
    try {
      if (this.closing.signal.aborted) return await sendError(stream, 'busy', 'node is shutting down', signal)
      if (count >= this.limits.maxInflightPerPeer) {
        return await sendError(stream, 'busy', `more than ${this.limits.maxInflightPerPeer} requests in flight`, signal)
      }
      let request: ChunkRequest
      try {
        request = await this.readRequest(stream)
      } catch (err) {
        const reason = (err as Error).message.includes('over the limit') ? 'too-large' : 'bad-request'
        this.components.onError?.(peer, err as Error)
        return await sendError(stream, reason, (err as Error).message, signal)
      }
      if (request.op === 'have') await this.answerHave(stream, request.digests, signal)
      else if (request.op === 'get') await this.answerGet(stream, peer, request.digests, signal)
      else await this.answerFetch(stream, peer, request.chunks, request.ref, signal)
      await stream.close({ signal })
    } catch (err) {
      this.components.onError?.(peer, err as Error)
      stream.abort(err as Error)
    } finally {
      signal.removeEventListener('abort', onAbort)
      stream.removeEventListener('close', onClose)
      const left = (this.inflight.get(peer) ?? 1) - 1
      if (left === 0) this.inflight.delete(peer)
      else this.inflight.set(peer, left)
    }
  }

  private async readRequest(stream: Stream): Promise<ChunkRequest> {
    for await (const frame of readFrames(stream, this.limits.maxRequestBytes)) {
      return parseRequest(frame, this.limits)
    }
    throw new ProtocolError('stream closed before a request')
  }

  private async answerHave(stream: Stream, digests: string[], signal: AbortSignal): Promise<void> {
    const bitmap = new Uint8Array(Math.ceil(digests.length / 8))
    for (const [i, digest] of digests.entries()) {
      if (await this.components.store.has(digest, { signal })) bitmap[i >> 3]! |= 1 << (i & 7)
    }
    await send(stream, encodeFrame(Uint8Array.of(HAVE), bitmap), signal)
  }

  private async answerGet(stream: Stream, peer: string, digests: string[], signal: AbortSignal): Promise<void> {
    const answer = { budget: this.limits.maxResponseBytes }
    for (const [i, digest] of digests.entries()) {
      if (!(await this.answerStored(stream, peer, i, digest, answer, signal))) await sendMissing(stream, i, signal)
    }
  }

  private async answerFetch(
    stream: Stream,
    peer: string,
    chunks: ChunkRef[],
    ref: string | undefined,
    signal: AbortSignal
  ): Promise<void> {
    const answer = { budget: this.limits.maxResponseBytes }
    // What the store holds goes out at once; the rest is fetched as one batch (the registry coalesces ranges).
    const lacking: number[] = []
    for (const [i, chunk] of chunks.entries()) {
      if (!(await this.answerStored(stream, peer, i, chunk.digest, answer, signal))) lacking.push(i)
    }
    const fetch = this.components.fetch
    const pending =
      lacking.length > 0 && fetch !== undefined
        ? await fetch(
            lacking.map((i) => chunks[i]!),
            ref,
            { signal }
          )
        : lacking.map(() => Promise.resolve(false))
    // Each chunk is answered as soon as it lands: the asker's fetcher takes a silent peer for a stalled one.
    const waiting = new Map(pending.map((p, j) => [j, p.then((landed) => ({ j, landed }))]))
    while (waiting.size > 0) {
      const { j, landed } = await Promise.race(waiting.values())
      waiting.delete(j)
      const index = lacking[j]!
      const sent = landed && (await this.answerStored(stream, peer, index, chunks[index]!.digest, answer, signal))
      if (!sent) await sendMissing(stream, index, signal)
    }
  }

  /**
   * Sends chunk `index` from the store if it is there and fits the answer's budget; false if not (the caller
   * says it is missing). Its bytes count against the node's queued-bytes bound from before they are read until
   * the stream has handed them to the muxer (within the window the reader grants), so answers nobody reads
   * cannot pile up in memory. The next chunk is read meanwhile, as far as the bound allows.
   */
  private async answerStored(
    stream: Stream,
    peer: string,
    index: number,
    digest: string,
    answer: { budget: number },
    signal: AbortSignal
  ): Promise<boolean> {
    if (answer.budget <= 0) return false
    // The size is known once read: room for the largest chunk first, the rest given back after the read.
    const reserved = Math.min(this.limits.maxChunkBytes, answer.budget)
    await this.queued.take(reserved, signal)
    let bytes: Uint8Array | undefined
    try {
      bytes = await this.components.store.get(digest, { signal })
    } catch (err) {
      this.queued.give(reserved)
      throw err
    }
    const size = bytes?.byteLength ?? 0
    if (bytes === undefined || size > answer.budget) {
      this.queued.give(reserved)
      return false
    }
    this.queued.give(reserved - size)
    try {
      // Header and bytes as two writes: the stream's buffer keeps both without copying the chunk.
      stream.send(encodeFrameHeader(1 + 4 + size, CHUNK, index))
      stream.send(bytes)
    } catch (err) {
      this.queued.give(size)
      throw err
    }
    void flushed(stream, signal)
      .catch(() => {})
      .finally(() => this.queued.give(size))
    this.components.onServed?.(peer, size)
    answer.budget -= size
    return true
  }
}

/**
 * A count of bytes with a ceiling, taken and given back; takers wait in order for room (or their signal). One
 * taker may take at most the whole ceiling.
 */
export class ByteBudget {
  #free: number
  readonly #waiting: Array<{ n: number; go: () => void }> = []

  constructor(readonly limit: number) {
    this.#free = limit
  }

  used(): number {
    return this.limit - this.#free
  }

  take(n: number, signal: AbortSignal): Promise<void> {
    const want = Math.min(n, this.limit)
    if (this.#waiting.length === 0 && this.#free >= want) {
      this.#free -= want
      return Promise.resolve()
    }
    return new Promise((resolve, reject) => {
      const waiter = {
        n: want,
        go: () => {
          signal.removeEventListener('abort', onAbort)
          resolve()
        }
      }
      const onAbort = () => {
        this.#waiting.splice(this.#waiting.indexOf(waiter), 1)
        reject(signal.reason)
        this.#wake()
      }
      signal.addEventListener('abort', onAbort, { once: true })
      this.#waiting.push(waiter)
    })
  }

  give(n: number): void {
    this.#free = Math.min(this.limit, this.#free + Math.min(n, this.limit))
    this.#wake()
  }

  #wake(): void {
    while (this.#waiting.length > 0 && this.#free >= this.#waiting[0]!.n) {
      const next = this.#waiting.shift()!
      this.#free -= next.n
      next.go()
    }
  }
}

function parseRequest(frame: Uint8Array, limits: ProtocolLimits): ChunkRequest {
  let msg: unknown
  try {
    msg = JSON.parse(new TextDecoder().decode(frame))
  } catch (err) {
    throw new ProtocolError('request is not JSON', { cause: err })
  }
  const m = msg as { op?: unknown; digests?: unknown; chunks?: unknown }
  if (m.op === 'have' || m.op === 'get') {
    if (!Array.isArray(m.digests) || !m.digests.every(isSha256Digest)) {
      throw new ProtocolError(`${m.op} request needs digests: an array of sha256:<hex>`)
    }
    if (m.digests.length > limits.maxDigestsPerRequest) {
      throw new ProtocolError(`${m.digests.length} digests is over the limit of ${limits.maxDigestsPerRequest}`)
    }
    return { op: m.op, digests: m.digests as string[] }
  }
  if (m.op === 'fetch') {
    const ref = (m as { ref?: unknown }).ref
    if (ref !== undefined && (typeof ref !== 'string' || ref.length > 1024)) {
      throw new ProtocolError('fetch request ref must be an image reference')
    }
    if (Array.isArray(m.chunks) && m.chunks.length > limits.maxDigestsPerRequest) {
      throw new ProtocolError(`${m.chunks.length} chunks is over the limit of ${limits.maxDigestsPerRequest}`)
    }
    // Chunks in the wire form older nodes know too (see chunk-wire.ts).
    const fallback = repositoryOfRequest(ref)
    const chunks = Array.isArray(m.chunks) ? m.chunks.map((c) => chunkFromWire(c, fallback)) : undefined
    if (chunks === undefined || !chunks.every((c) => c !== undefined)) {
      throw new ProtocolError('fetch request needs chunks: an array of chunk references')
    }
    return { op: 'fetch', chunks, ...(ref !== undefined ? { ref } : {}) }
  }
  throw new ProtocolError(`unknown request op ${JSON.stringify(m.op)}`)
}

function u32(n: number): Uint8Array {
  const b = new Uint8Array(4)
  new DataView(b.buffer).setUint32(0, n)
  return b
}

async function send(stream: Stream, frame: Uint8Array, signal: AbortSignal): Promise<void> {
  if (!stream.send(frame)) await stream.onDrain({ signal })
}

function sendMissing(stream: Stream, index: number, signal: AbortSignal): Promise<void> {
  return send(stream, encodeFrame(Uint8Array.of(MISSING), u32(index)), signal)
}

/** The first bytes of a frame of `length` bytes whose body starts with `type` and a u32 index. */
function encodeFrameHeader(length: number, type: number, index: number): Uint8Array {
  const header = new Uint8Array(9)
  const view = new DataView(header.buffer)
  view.setUint32(0, length)
  header[4] = type
  view.setUint32(5, index)
  return header
}

async function sendError(stream: Stream, reason: string, message: string, signal: AbortSignal): Promise<void> {
  await send(
    stream,
    encodeFrame(Uint8Array.of(ERROR), new TextEncoder().encode(JSON.stringify({ reason, message }))),
    signal
  )
  await stream.close({ signal })
}

/** Sends a request on a fresh stream and closes the writing side. */
function sendRequest(stream: Stream, request: ChunkRequest, limits: ProtocolLimits): void {
  const wire = request.op === 'fetch' ? { ...request, chunks: request.chunks.map(chunkToWire) } : request
  const body = new TextEncoder().encode(JSON.stringify(wire))
  if (body.byteLength > limits.maxRequestBytes) {
    throw new RangeError(`request of ${body.byteLength} bytes is over the limit of ${limits.maxRequestBytes}`)
  }
  stream.send(encodeFrame(body))
}

/** Aborts the stream when `options.signal` fires or the request outlives its timeout. */
function guard(stream: Stream, peer: string, limits: ProtocolLimits, options?: AbortOptions): () => void {
  const signals = [AbortSignal.timeout(limits.requestTimeoutMs)]
  if (options?.signal !== undefined) signals.push(options.signal)
  const signal = AbortSignal.any(signals)
  const onAbort = () =>
    stream.abort(
      options?.signal?.aborted === true
        ? (options.signal.reason as Error)
        : new PeerTimeoutError(`peer ${peer} did not answer within ${limits.requestTimeoutMs} ms`)
    )
  signal.addEventListener('abort', onAbort, { once: true })
  return () => signal.removeEventListener('abort', onAbort)
}

function refusal(peer: string, payload: Uint8Array): PeerRefusedError {
  let reason = 'unknown'
  let message = ''
  try {
    const m = JSON.parse(new TextDecoder().decode(payload)) as { reason?: unknown; message?: unknown }
    reason = String(m.reason)
    message = String(m.message)
  } catch {
    message = 'unreadable error frame'
  }
  return new PeerRefusedError(`peer ${peer} refused the request (${reason}): ${message}`, reason)
}

/** Asks which of `digests` the peer holds. */
export async function requestHave(
  stream: Stream,
  peer: string,
  digests: string[],
  limits: ProtocolLimits = DEFAULT_LIMITS,
  options?: AbortOptions
): Promise<boolean[]> {
  const release = guard(stream, peer, limits, options)
  try {
    sendRequest(stream, { op: 'have', digests }, limits)
    await stream.close()
    for await (const frame of readFrames(stream, Math.ceil(digests.length / 8) + 1 + limits.maxRequestBytes)) {
      if (frame[0] === ERROR) throw refusal(peer, frame.subarray(1))
      if (frame[0] !== HAVE || frame.byteLength !== 1 + Math.ceil(digests.length / 8)) {
        throw new ProtocolError(`peer ${peer} sent a malformed have answer`)
      }
      return digests.map((_, i) => (frame[1 + (i >> 3)]! & (1 << (i & 7))) !== 0)
    }
    throw new ProtocolError(`peer ${peer} closed the stream without answering`)
  } catch (err) {
    stream.abort(err as Error)
    throw err
  } finally {
    release()
  }
}

/**
 * Asks the peer for chunks (`get` by digest, or `fetch` of chunks it is home of) and yields each answer as it
 * arrives: bytes, or undefined when the peer does not have it. Enforces the answer's limits.
 */
export async function* requestChunks(
  stream: Stream,
  peer: string,
  request: { op: 'get'; digests: string[] } | { op: 'fetch'; chunks: ChunkRef[]; ref?: string },
  limits: ProtocolLimits = DEFAULT_LIMITS,
  options?: AbortOptions
): AsyncGenerator<ChunkAnswer> {
  const count = request.op === 'get' ? request.digests.length : request.chunks.length
  const answered = new Set<number>()
  let received = 0
  const release = guard(stream, peer, limits, options)
  try {
    sendRequest(stream, request, limits)
    await stream.close()
    for await (const frame of readFrames(stream, 5 + Math.max(limits.maxChunkBytes, limits.maxRequestBytes))) {
      const type = frame[0]
      if (type === ERROR) throw refusal(peer, frame.subarray(1))
      if ((type !== CHUNK && type !== MISSING) || frame.byteLength < 5) {
        throw new ProtocolError(`peer ${peer} sent an unknown frame type ${type}`)
      }
      const index = new DataView(frame.buffer, frame.byteOffset, frame.byteLength).getUint32(1)
      if (index >= count || answered.has(index)) {
        throw new ProtocolError(`peer ${peer} answered for chunk #${index}, which was not asked or already answered`)
      }
      answered.add(index)
      if (type === MISSING) {
        yield { index, bytes: undefined }
        continue
      }
      received += frame.byteLength - 5
      if (received > limits.maxResponseBytes) {
        throw new ProtocolError(`peer ${peer} sent more than ${limits.maxResponseBytes} bytes in one answer`)
      }
      yield { index, bytes: frame.subarray(5) }
    }
    if (answered.size !== count) {
      throw new ProtocolError(`peer ${peer} answered ${answered.size} of ${count} chunks and closed the stream`)
    }
  } catch (err) {
    stream.abort(err as Error)
    throw err
  } finally {
    release()
  }
}
