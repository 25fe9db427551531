import type { Stream } from '@libp2p/interface'
import { Uint8ArrayList } from 'uint8arraylist'
import { ProtocolError } from './errors.js'

/**
 * Frames of the chunk protocol: a 4-byte big-endian length, then that many bytes. A reader rejects a frame
 * longer than its limit before buffering it, so a peer cannot make us hold more than one frame's worth.
 */
export function encodeFrame(...parts: Uint8Array[]): Uint8Array {
  const length = parts.reduce((n, p) => n + p.byteLength, 0)
  const out = new Uint8Array(4 + length)
  new DataView(out.buffer).setUint32(0, length)
  let at = 4
  for (const p of parts) {
    out.set(p, at)
    at += p.byteLength
  }
  return out
}

/** Yields each whole frame of `source`; throws ProtocolError on a frame over `maxFrame` or a cut-off frame. */
export async function* readFrames(
  source: AsyncIterable<Uint8Array | Uint8ArrayList>,
  maxFrame: number
): AsyncGenerator<Uint8Array> {
  const buffer = new Uint8ArrayList()
  for await (const data of source) {
    buffer.append(data)
    for (;;) {
      if (buffer.byteLength < 4) break
      const length = buffer.getUint32(0)
      if (length > maxFrame) throw new ProtocolError(`frame of ${length} bytes is over the limit of ${maxFrame}`)
      if (buffer.byteLength < 4 + length) break
      const frame = buffer.subarray(4, 4 + length)
      buffer.consume(4 + length)
      yield frame
    }
  }
  if (buffer.byteLength > 0) throw new ProtocolError(`stream ended inside a frame (${buffer.byteLength} bytes left)`)
}

/**
 * Waits until the stream's write buffer is empty: what was sent is with the muxer, within the window the reader
 * granted. (A drain of the connection does not mean that: a reader that does not read keeps its window shut.)
 */
export async function flushed(stream: Stream, signal: AbortSignal): Promise<void> {
  while (stream.writeBufferLength > 0) {
    signal.throwIfAborted()
    if (stream.status !== 'open') throw new ProtocolError(`the stream was ${stream.status} before the answer was sent`)
    await new Promise<void>((resolve) => {
      const done = () => {
        for (const event of ['idle', 'drain', 'close'] as const) stream.removeEventListener(event, done)
        signal.removeEventListener('abort', done)
        resolve()
      }
      for (const event of ['idle', 'drain', 'close'] as const) stream.addEventListener(event, done)
      signal.addEventListener('abort', done)
    })
  }
}
