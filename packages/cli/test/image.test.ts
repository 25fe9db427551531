import { createHash } from 'node:crypto'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createRegistryClient, MediaType, type RegistryClient } from '@strata/registry'
import { runCli } from '@test/cli.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

let reg: TestRegistry
let client: RegistryClient
let dir: string

const p2p = (...argv: string[]) => runCli(argv)

beforeAll(async () => {
  reg = await startRegistry()
  client = createRegistryClient({ dockerConfig: false })
  dir = await mkdtemp(join(tmpdir(), 'strata-cli-image-'))
  await writeFile(join(dir, 'hello.txt'), 'hello\n')
  await run('tar', ['-C', dir, '-czf', join(dir, 'layer.tar.gz'), 'hello.txt'])
  await run('tar', ['-C', dir, '-cf', join(dir, 'layer.tar'), 'hello.txt'])
  // A one-layer OCI image of a real tar.gz.
  const gz = await readFile(join(dir, 'layer.tar.gz'))
  const tar = await readFile(join(dir, 'layer.tar'))
  const sha = (b: Uint8Array) => `sha256:${createHash('sha256').update(b).digest('hex')}`
  const ref = `${reg.host}/cli/app:1`
  await client.pushBlob(ref, sha(gz), gz)
  const config = Buffer.from(
    JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [sha(tar)] } })
  )
  await client.pushBlob(ref, sha(config), config)
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MediaType.ociManifest,
      config: { mediaType: MediaType.ociConfig, digest: sha(config), size: config.length },
      layers: [{ mediaType: MediaType.ociLayerGzip, digest: sha(gz), size: gz.length }]
    })
  )
  await client.putManifest(ref, manifest, MediaType.ociManifest)
})

afterAll(async () => {
  await reg?.stop()
  await rm(dir, { recursive: true, force: true })
})

describe('p2pctl inspect and convert', () => {
  it('inspect shows a plain gzip layer as not eStargz', async () => {
    const r = await p2p('inspect', `${reg.host}/cli/app:1`)
    expect(r.code).toBe(0)
    expect(r.stdout).toContain(`image: ${reg.host}/cli/app:1`)
    expect(r.stdout).toMatch(/^media-type: application\/vnd\.oci\.image\.manifest\.v1\+json$/m)
    expect(r.stdout).toMatch(/^estargz: 0\/1$/m)
    expect(r.stdout).toMatch(
      /^layer 0: sha256:[a-f0-9]{64} \d+ B application\/vnd\.oci\.image\.layer\.v1\.tar\+gzip not eStargz$/m
    )
  })

  it('convert writes an eStargz image; inspect finds its TOC by annotation and, without it, by the footer', async () => {
    const r = await p2p(
      'convert',
      `${reg.host}/cli/app:1`,
      `${reg.host}/cli/app:esgz`,
      '--chunk-size',
      '1MiB',
      '--json'
    )
    expect(r.code).toBe(0)
    const result = JSON.parse(r.stdout) as {
      digest: string
      images: { layers: { tocDigest: string; converted: boolean }[] }[]
    }
    const toc = result.images[0]!.layers[0]!.tocDigest
    expect(result.images[0]!.layers[0]!.converted).toBe(true)

    const i1 = await p2p('inspect', `${reg.host}/cli/app:esgz`, '--json')
    const j1 = JSON.parse(i1.stdout) as {
      digest: string
      layers: { estargz: boolean; tocDigest: string; from: string }[]
    }
    expect(j1.digest).toBe(result.digest)
    expect(j1.layers[0]).toMatchObject({ estargz: true, tocDigest: toc, from: 'annotation' })

    // The same blobs under a manifest without annotations: found by a Range read of the footer.
    const img = await client.getImage(`${reg.host}/cli/app:esgz`)
    const bare = Buffer.from(
      JSON.stringify({ ...img.manifest, layers: img.layers.map(({ annotations: _, ...l }) => l) })
    )
    await client.putManifest(`${reg.host}/cli/app:bare`, bare, MediaType.ociManifest)
    const i2 = await p2p('inspect', `${reg.host}/cli/app:bare`)
    expect(i2.code).toBe(0)
    expect(i2.stdout).toContain(`eStargz toc ${toc} (from footer)`)
  })

  it('inspect narrows an index to a platform and lists the others', async () => {
    const img = await client.getImage(`${reg.host}/cli/app:1`)
    const entry = { mediaType: MediaType.ociManifest, digest: img.digest, size: img.manifestBytes.length }
    const index = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MediaType.ociIndex,
        manifests: [
          { ...entry, platform: { os: 'linux', architecture: 'amd64' } },
          { ...entry, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } }
        ]
      })
    )
    await client.putManifest(`${reg.host}/cli/app:multi`, index, MediaType.ociIndex)
    const r = await p2p('inspect', `${reg.host}/cli/app:multi`, '--platform', 'linux/arm64')
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/^index: sha256:[a-f0-9]{64}$/m)
    expect(r.stdout).toMatch(/^platforms: linux\/amd64, linux\/arm64\/v8$/m)
    expect(r.stdout).toMatch(/^platform: linux\/arm64\/v8$/m)
    expect(r.stdout).toContain(`digest: ${img.digest}`)
    const none = await p2p('inspect', `${reg.host}/cli/app:multi`, '--platform', 'linux/s390x')
    expect(none.code).toBe(1)
    expect(none.stderr).toContain('no image for platform linux/s390x')
    expect(none.stderr).toContain('hint: choose one of those with --platform')
  })

  it('convert prints a summary and progress lines; bad words are usage errors', async () => {
    const layout = join(dir, 'oci')
    const r = await p2p('convert', `${reg.host}/cli/app:1`, `oci:${layout}:v1`)
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/^layers-converted: 1$/m)
    expect(r.stdout).toContain(`destination: oci:${layout}:v1`)
    expect(r.stderr).toMatch(/layer [a-f0-9]{12} -> [a-f0-9]{12} eStargz/)
    expect(JSON.parse(await readFile(join(layout, 'index.json'), 'utf8')).manifests).toHaveLength(1)

    const u = await p2p('convert', `${reg.host}/cli/app:1`, `${reg.host}/cli/x:1`, '--creds', 'nocolon')
    expect(u.code).toBe(2)
    expect(u.stderr).toContain('--creds must be HOST=USER:PASS or USER:PASS')
    const bad = await p2p('inspect', 'Bad//ref')
    expect(bad.code).toBe(2)
    expect(bad.stderr).toContain("invalid image reference 'Bad//ref'")
    const missing = await p2p('inspect', `${reg.host}/cli/app:nope`)
    expect(missing.code).toBe(1)
    expect(missing.stderr).toMatch(/error: .*cli\/app.*not found/)
    expect(missing.stderr).toMatch(/hint: /)
  })
})
