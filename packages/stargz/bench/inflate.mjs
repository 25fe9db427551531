// pako against node:zlib on the chunk inflate path (stargz inflateChunk): one gzip member per chunk, inflated
// whole. Prints MiB/s of inflated bytes for each, and pako's ratio against zlib in the same run.
//
//   node packages/stargz/bench/inflate.mjs
import { gzipSync } from 'node:zlib'
import pako from 'pako'
import { inflateChunk } from '../dist/chunk.js'

function sample(size, seed) {
  // Text-like bytes (compress about 3:1, as binaries and libraries do), deterministic.
  const words = ['lib', 'usr', 'share', 'python3', 'import', 'def ', 'return', 'self', '\n', '    ', '0x', 'ELF']
  const out = Buffer.alloc(size)
  let x = seed
  for (let i = 0; i < size; ) {
    x = (x * 1103515245 + 12345) & 0x7fffffff
    const w = x % 7 === 0 ? String.fromCharCode(33 + (x % 90)) : words[x % words.length]
    i += out.write(w, i)
  }
  return out
}

const MiB = 1024 * 1024
for (const size of [16 * 1024, 256 * 1024, 4 * MiB]) {
  const chunks = Array.from({ length: Math.max(4, Math.round((64 * MiB) / size)) }, (_, i) => sample(size, i + 1))
  const members = chunks.map((c) => gzipSync(c, { level: 9 }))
  const total = chunks.length * size
  const run = async (name, fn) => {
    let best = Infinity
    for (let r = 0; r < 3; r++) {
      const t = performance.now()
      for (let i = 0; i < members.length; i++) await fn(members[i], chunks[i].length)
      best = Math.min(best, performance.now() - t)
    }
    return { name, mibs: total / MiB / (best / 1000) }
  }
  const zlib = await run('node:zlib (inflateChunk)', (m, n) =>
    inflateChunk('gzip', m, { digest: 'x', size: n, innerOffset: 0, offset: 0 })
  )
  const pk = await run('pako.inflate', (m) => pako.inflate(m))
  console.log(
    `${size / 1024} KiB chunks: ${zlib.name} ${zlib.mibs.toFixed(0)} MiB/s, ${pk.name} ${pk.mibs.toFixed(0)} MiB/s (${(pk.mibs / zlib.mibs).toFixed(2)}x)`
  )
}
