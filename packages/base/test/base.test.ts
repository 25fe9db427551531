import { createHash } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { digestHasher, digestHex, isSha256Digest, META, StrataError, sha256Digest, sha256Hex } from '../src/index.js'

describe('digests', () => {
  const bytes = new TextEncoder().encode('strata')
  const hex = createHash('sha256').update(bytes).digest('hex')

  it('spells sha256 digests one way, whole or in pieces', () => {
    expect(sha256Digest(bytes)).toBe(`sha256:${hex}`)
    expect(sha256Digest('strata')).toBe(`sha256:${hex}`)
    expect(sha256Hex(bytes)).toBe(hex)
    expect(digestHasher().update('str').update(new TextEncoder().encode('ata')).digest()).toBe(`sha256:${hex}`)
    expect(digestHex(`sha256:${hex}`)).toBe(hex)
  })

  it('accepts only well-formed sha256 digests', () => {
    expect(isSha256Digest(`sha256:${hex}`)).toBe(true)
    for (const bad of [hex, `sha256:${hex.toUpperCase()}`, `sha256:${hex}0`, `sha512:${hex}`, 7, undefined])
      expect(isSha256Digest(bad)).toBe(false)
  })
})

describe('metadata key spaces', () => {
  it('keeps every key space apart: no space is a prefix of another', () => {
    // Each space up to its parameter; a constant key is a space of one.
    const spaces = Object.values(META).map((k) => (typeof k === 'string' ? k : k('\0', undefined).split('\0')[0]!))
    for (const a of spaces) for (const b of spaces) if (a !== b) expect(b.startsWith(a), `${a} / ${b}`).toBe(false)
    expect(new Set(spaces).size).toBe(spaces.length)
  })
})

describe('StrataError', () => {
  class ExampleError extends StrataError {
    override readonly name = 'ExampleError'
    override readonly code = 'ERR_EXAMPLE'
  }

  it('carries a stable name, code, hint and cause', () => {
    const cause = new Error('below')
    const e = new ExampleError('it failed', { hint: 'do this', cause })
    expect(e).toBeInstanceOf(Error)
    expect([e.name, e.code, e.hint, e.message, e.cause]).toEqual([
      'ExampleError',
      'ERR_EXAMPLE',
      'do this',
      'it failed',
      cause
    ])
    expect(String(e)).toBe('ExampleError: it failed')
    expect(new ExampleError('x').hint).toBeUndefined()
  })
})
