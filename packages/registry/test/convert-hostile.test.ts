import { PassThrough, Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { bufferReader, buildEstargz, openLayer } from '@strata/stargz'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import {
  BENIGN_PATHS,
  BENIGN_TAR,
  builderMessage,
  HOSTILE_TARS,
  tar,
  tocParserReason
} from '../../stargz/test/hostile-tars.js'
import {
  type ConvertEvent,
  convertImage,
  createRegistryClient,
  MediaType,
  openImageRepo,
  type RegistryClient
} from '../src/index.js'
import { sha } from './image.js'

let reg: TestRegistry
let client: RegistryClient

/** Pushes an OCI image of one tar.gz layer made of `tar` (or that is `gz`, with these annotations). */
async function pushTarImage(
  ref: string,
  tar: Buffer,
  layer: { gz?: Buffer; annotations?: Record<string, string> } = {}
): Promise<void> {
  const gz = layer.gz ?? gzipSync(tar)
  const config = Buffer.from(
    JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [sha(tar)] } })
  )
  await client.pushBlob(ref, sha(gz), gz)
  await client.pushBlob(ref, sha(config), config)
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: MediaType.ociConfig, digest: sha(config), size: config.length },
      layers: [{ mediaType: MediaType.ociLayerGzip, digest: sha(gz), size: gz.length, annotations: layer.annotations }]
    })
  )
  await client.putManifest(ref, manifest, MediaType.ociManifest)
}

async function catalog(): Promise<string[]> {
  const res = await fetch(`${reg.url}/v2/_catalog?n=1000`)
  return ((await res.json()) as { repositories: string[] }).repositories
}

beforeAll(async () => {
  reg = await startRegistry()
  client = createRegistryClient({ dockerConfig: false })
})

afterAll(async () => {
  await reg?.stop()
})

describe('convertImage of layers that name files outside the layer', () => {
  it.each(HOSTILE_TARS.map((c, i) => [c.label, c, i] as const))('refuses %s and writes nothing', async (_, c, i) => {
    const src = `${reg.host}/src/hostile-${i}:1`
    await pushTarImage(src, c.tar)
    const events: ConvertEvent[] = []
    const err = await convertImage(
      openImageRepo(src, client),
      openImageRepo(`${reg.host}/dst/hostile-${i}:1`, client),
      {
        onEvent: (e) => events.push(e)
      }
    ).then(
      () => undefined,
      (e: unknown) => e as Error & { reason?: string }
    )
    expect(err?.name).toBe('UnsafeTarEntryError')
    expect(err?.message).toBe(builderMessage(c))
    expect(err?.reason).toBe(tocParserReason(c))
    expect(events.filter((e) => e.type === 'write')).toEqual([])
  })

  it('refuses a layer that is eStargz already, annotated, and names a file outside the layer', async () => {
    // Built from a harmless tar, then its TOC rewritten to name `../evil`: the footer's TOC offset stays right.
    const out = new PassThrough()
    const parts: Buffer[] = []
    out.on('data', (d: Buffer) => parts.push(d))
    const built = await buildEstargz(
      Readable.from([
        tar([
          { name: 'ok/file', content: 'fine\n' },
          { name: 'xx/evil', content: 'evil\n' }
        ])
      ]),
      out
    )
    const blob = Buffer.concat(parts)
    const json = Buffer.from((await openLayer(bufferReader(blob))).tocBytes)
      .toString()
      .replace('"xx/evil"', '"../evil"')
    const tocMember = gzipSync(tar([{ name: 'stargz.index.json', content: json }]))
    const gz = Buffer.concat([blob.subarray(0, built.tocOffset), tocMember, blob.subarray(blob.length - 51)])
    const annotations = { 'containerd.io/snapshot/stargz/toc.digest': sha(json) }
    await pushTarImage(`${reg.host}/src/hostile-estargz:1`, Buffer.alloc(0), { gz, annotations })

    const events: ConvertEvent[] = []
    const err = await convertImage(
      openImageRepo(`${reg.host}/src/hostile-estargz:1`, client),
      openImageRepo(`${reg.host}/dst/hostile-estargz:1`, client),
      { onEvent: (e) => events.push(e) }
    ).then(
      () => undefined,
      (e: unknown) => e as Error
    )
    expect(err?.name).toBe('InvalidTOCError')
    expect(err?.message).toMatch(
      /^TOC entry #\d+ \("\.\.\/evil"\): name "\.\.\/evil" contains '\.\.' and could escape the layer$/
    )
    expect(events.filter((e) => e.type === 'write')).toEqual([])
  })

  it('pushed nothing for any of them, and still converts an image with names the TOC parser normalises', async () => {
    expect((await catalog()).filter((r) => r.startsWith('dst/'))).toEqual([])

    await pushTarImage(`${reg.host}/src/benign:1`, BENIGN_TAR)
    const result = await convertImage(
      openImageRepo(`${reg.host}/src/benign:1`, client),
      openImageRepo(`${reg.host}/dst/benign:1`, client)
    )
    expect(result.images[0]!.layers[0]!.converted).toBe(true)
    expect((await catalog()).filter((r) => r.startsWith('dst/'))).toEqual(['dst/benign'])
    // The converted layer opens with strata's own TOC parser, names normalised.
    const image = await client.getImage(`${reg.host}/dst/benign:1`)
    const layer = await openLayer(client.blob(`${reg.host}/dst/benign:1`, image.layers[0]!))
    for (const p of BENIGN_PATHS) expect(layer.toc.lookup(p), p).toBeDefined()
  })
})
