import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { RegistryError } from '../src/errors.js'
import { MediaType, parseManifest } from '../src/manifest.js'
import { parseReference } from '../src/reference.js'

/** Hostile registries and typos: a parser may accept or refuse, but only ever with a RegistryError. */
function onlyRegistryErrors(fn: () => unknown): void {
  try {
    fn()
  } catch (err) {
    if (!(err instanceof RegistryError)) throw err
    expect(err.message.length).toBeGreaterThan(0)
  }
}

const digest = fc.stringMatching(/^sha256:[0-9a-f]{64}$/)
const descriptor = fc.record(
  {
    mediaType: fc.oneof(fc.constant(MediaType.ociLayer), fc.string()),
    digest: fc.oneof(digest, fc.string()),
    size: fc.oneof(fc.nat(), fc.integer(), fc.double(), fc.string()),
    annotations: fc.dictionary(fc.string(), fc.oneof(fc.string(), fc.integer()))
  },
  { requiredKeys: [] }
)
const manifestish = fc.record(
  {
    schemaVersion: fc.oneof(fc.constant(2), fc.integer(), fc.string()),
    mediaType: fc.string(),
    config: fc.oneof(descriptor, fc.anything()),
    layers: fc.oneof(fc.array(descriptor, { maxLength: 4 }), fc.anything()),
    manifests: fc.oneof(fc.array(descriptor, { maxLength: 4 }), fc.anything())
  },
  { requiredKeys: [] }
)
const mediaTypes = fc.constantFrom(
  MediaType.ociManifest,
  MediaType.ociIndex,
  MediaType.dockerManifest,
  MediaType.dockerManifestList,
  'application/json',
  ''
)
const subject = { registry: 'fuzz.example', repository: 'fuzz/app' }

describe('parser fuzzing', () => {
  it('parseReference: any string parses or is an InvalidReferenceError', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.stringMatching(/^[a-z0-9.:/@_-]{0,80}$/)), (s) => {
        try {
          const ref = parseReference(s)
          // What parses must print back to a reference that parses to the same thing.
          expect(parseReference(ref.toString()).toString()).toBe(ref.toString())
        } catch (err) {
          expect((err as Error).name).toBe('InvalidReferenceError')
        }
      }),
      { numRuns: 3000 }
    )
  })

  it('parseManifest: arbitrary bytes and manifest-shaped JSON only ever give RegistryErrors', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 256 }), mediaTypes, (bytes, type) => {
        onlyRegistryErrors(() => parseManifest(bytes, type, subject))
      }),
      { numRuns: 2000 }
    )
    fc.assert(
      fc.property(manifestish, mediaTypes, (body, type) => {
        onlyRegistryErrors(() => parseManifest(new TextEncoder().encode(JSON.stringify(body)), type, subject))
      }),
      { numRuns: 3000 }
    )
  })
})
