import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { encodeFrame, readFrames } from '../src/frames.js'

async function* pieces(bytes: Uint8Array, cuts: number[]): AsyncGenerator<Uint8Array> {
  let at = 0
  for (const cut of [...cuts.map((c) => c % (bytes.byteLength + 1))].sort((a, b) => a - b)) {
    yield bytes.subarray(at, Math.max(at, cut))
    at = Math.max(at, cut)
  }
  yield bytes.subarray(at)
}

async function collect(source: AsyncIterable<Uint8Array>): Promise<Uint8Array[]> {
  const out: Uint8Array[] = []
  for await (const f of source) out.push(f)
  return out
}

/** What a hostile or broken peer can send: the frame reader yields exactly the frames sent, or a ProtocolError. */
describe('chunk protocol frames under fuzzing', () => {
  it('reassembles any frames cut anywhere', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 10 }),
        async (frames, cuts) => {
          const wire = Buffer.concat(frames.map((f) => encodeFrame(f)))
          const got = await collect(readFrames(pieces(wire, cuts), 1000))
          expect(got.map((f) => Buffer.from(f).toString('hex'))).toEqual(
            frames.map((f) => Buffer.from(f).toString('hex'))
          )
        }
      ),
      { numRuns: 2000 }
    )
  })

  it('never yields more than the limit and fails only with a ProtocolError on garbage', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 600 }), fc.array(fc.nat(), { maxLength: 6 }), async (wire, cuts) => {
        try {
          for await (const frame of readFrames(pieces(wire, cuts), 256))
            expect(frame.byteLength).toBeLessThanOrEqual(256)
        } catch (err) {
          expect((err as Error).name).toBe('ProtocolError')
        }
      }),
      { numRuns: 3000 }
    )
  })
})
