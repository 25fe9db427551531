import type { ChunkRef } from '@strata/fetcher'
import { describe, expect, it } from 'vitest'
import { chunkFromWire, chunkToWire, repositoryOfRequest } from '../src/chunk-wire.js'

const LAYER = `sha256:${'a'.repeat(64)}`
const chunk: ChunkRef = {
  digest: `sha256:${'b'.repeat(64)}`,
  layer: { digest: LAYER, repository: 'registry.example:5000/team/app' },
  compression: 'gzip',
  fileOffset: 0,
  size: 10,
  offset: 100,
  end: 140,
  innerOffset: 0
}

describe('a chunk on the wire', () => {
  it('keeps the layer digest where older nodes read it, with the repository beside it', () => {
    const wire = chunkToWire(chunk)
    expect(wire.layer).toBe(LAYER)
    expect(wire.repository).toBe('registry.example:5000/team/app')
    expect(chunkFromWire(JSON.parse(JSON.stringify(wire)), '')).toEqual(chunk)
    const indexed = { ...chunk, indexed: true as const }
    expect(chunkFromWire(chunkToWire(indexed), '')).toEqual(indexed)
  })

  it("takes the repository of an older node's chunk from the request's ref, or none without one", () => {
    const { repository: _, ...old } = chunkToWire(chunk)
    const fallback = repositoryOfRequest('registry.example:5000/team/app:1.0')
    expect(fallback).toBe('registry.example:5000/team/app')
    expect(chunkFromWire(old, fallback)?.layer).toEqual(chunk.layer)
    expect(repositoryOfRequest(undefined)).toBe('')
    expect(repositoryOfRequest('Not A Reference')).toBe('')
    expect(chunkFromWire(old, '')?.layer).toEqual({ digest: LAYER, repository: '' })
    // docker.io names travel in full: what repositoryOf writes.
    expect(repositoryOfRequest('ubuntu')).toBe('docker.io/library/ubuntu')
  })

  it('refuses a repository that is not a plain host/name, and other malformed fields', () => {
    const wire = chunkToWire(chunk)
    for (const repository of [
      'registry.example/app:tag',
      `registry.example/app@sha256:${'c'.repeat(64)}`,
      'ubuntu',
      'Registry.example/App',
      `registry.example/${'a'.repeat(600)}`,
      '',
      42
    ]) {
      expect(chunkFromWire({ ...wire, repository }, ''), String(repository)).toBeUndefined()
    }
    expect(chunkFromWire({ ...wire, layer: chunk.layer }, '')).toBeUndefined()
    expect(chunkFromWire({ ...wire, indexed: false }, '')).toBeUndefined()
    expect(chunkFromWire({ ...wire, end: 1 }, '')).toBeUndefined()
    expect(chunkFromWire(null, '')).toBeUndefined()
  })
})
