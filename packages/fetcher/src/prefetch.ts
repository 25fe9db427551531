import { sleep } from './async.js'
import { chunkRef } from './chunk-ref.js'
import { sum } from './engine.js'
import type { ChunkEngine, ChunkRef, FetchEvent, Image, PrefetchOptions } from './types.js'

/**
 * Fetches the prioritized files of every layer of `image` (those before `.prefetch.landmark`) into the store,
 * then, with `wholeLayerBytesPerSecond`, every other chunk at that rate.
 */
export async function prefetchImage(
  engine: Pick<ChunkEngine, 'ensure'>,
  image: Image,
  options: PrefetchOptions,
  emit: (event: FetchEvent) => void
): Promise<void> {
  // Every layer's prioritized range at once: they are what the workload reads first.
  await Promise.all(
    image.layers.map(async (layer) => {
      const refs = layer.toc.prioritized.flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
      await engine.ensure(refs, options)
      emit({ type: 'prefetch', layer: layer.digest, bytes: sum(refs), total: sum(refs) })
    })
  )
  const rate = options.wholeLayerBytesPerSecond ?? 0
  if (rate <= 0) return
  for (const layer of image.layers) {
    const refs = [...layer.toc.entries.values()].flatMap((e) => e.chunks.map((c) => chunkRef(layer, c)))
    const total = sum(refs)
    let done = 0
    // Batches of about one second's worth, each followed by the wait that keeps the average of the bytes
    // actually fetched under the rate (chunks already in the store cost nothing).
    for (let i = 0; i < refs.length; ) {
      const started = Date.now()
      const batch: ChunkRef[] = []
      let bytes = 0
      while (i < refs.length && (batch.length === 0 || bytes + refs[i]!.size <= rate)) {
        bytes += refs[i]!.size
        batch.push(refs[i++]!)
      }
      const fetched = await engine.ensure(batch, options)
      done += bytes
      emit({ type: 'prefetch', layer: layer.digest, bytes: done, total })
      const wait = (fetched / rate) * 1000 - (Date.now() - started)
      if (wait > 0) await sleep(wait, options.signal)
    }
  }
}
