import { createHash } from 'node:crypto'
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'
import { zstdCompressSync } from 'node:zlib'
import { oraclePath, run } from './tools.js'

/**
 * Test images without the converter: tars of real directories, made eStargz by the reference
 * implementation (`oracle build`) or plain gzip, written as an OCI layout by hand and pushed with skopeo.
 */
export interface TestLayerSpec {
  /** A directory whose contents become the layer (paths relative to it). */
  files: string
  /** Paths (relative, e.g. `bin/sh`) to put before `.prefetch.landmark` (eStargz only). */
  prioritized?: string[]
  /** Extra GNU tar arguments, e.g. `['--format=pax', '--xattrs']`. */
  tarArgs?: string[]
}

export interface BuildTestImageOptions {
  /** `host:port` of the registry to push to. */
  registry: string
  /** Repository name. Default `test/image`. */
  repository?: string
  tag?: string
  layers: TestLayerSpec[]
  /** eStargz layers (oracle build) or plain tars. */
  estargz: boolean
  /** Compression of plain (not eStargz) layers. Default gzip. (Uncompressed tars are not offered: skopeo gzips them on push.) */
  plainCompression?: 'gzip' | 'zstd'

  /** Leave out the `containerd.io/snapshot/stargz/toc.digest` annotation (eStargz only). */
  omitTocAnnotation?: boolean
  /** Replace the TOC-digest annotation of every layer with this value (to test refusal). */
  tocAnnotation?: string
  /** gzip level for the eStargz builder (1-9). Default 9, as the reference's default. */
  gzipLevel?: number
}

export interface TestImageLayer {
  digest: string
  size: number
  diffId: string
  /** The TOC digest (eStargz layers). */
  tocDigest?: string
  annotations: Record<string, string>
  /** Path in the layer (no `./`) -> sha256 hex of the file's bytes, for every regular file. */
  files: Map<string, string>
  /** Path -> size in bytes, for every regular file. */
  sizes: Map<string, number>
}

export interface TestImage {
  /** `host:port/repository:tag` */
  ref: string
  /** The manifest digest. */
  digest: string
  layers: TestImageLayer[]
}

const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex')

async function hashFiles(root: string): Promise<{ files: Map<string, string>; sizes: Map<string, number> }> {
  const files = new Map<string, string>()
  const sizes = new Map<string, number>()
  const walk = async (dir: string) => {
    for (const d of await readdir(dir, { withFileTypes: true })) {
      const p = join(dir, d.name)
      if (d.isDirectory()) await walk(p)
      else if (d.isFile()) {
        const rel = relative(root, p)
        const bytes = await readFile(p)
        files.set(rel, sha256(bytes))
        sizes.set(rel, bytes.byteLength)
      }
    }
  }
  await walk(root)
  return { files, sizes }
}

async function putBlob(layout: string, bytes: Uint8Array): Promise<{ digest: string; size: number }> {
  const hex = sha256(bytes)
  await writeFile(join(layout, 'blobs', 'sha256', hex), bytes)
  return { digest: `sha256:${hex}`, size: bytes.byteLength }
}

/** Builds an image from directories, pushes it to a registry, and returns its reference and expected contents. */
export async function buildTestImage(options: BuildTestImageOptions): Promise<TestImage> {
  const work = await mkdtemp(join(tmpdir(), 'strata-image-'))
  try {
    const layout = join(work, 'oci')
    await mkdir(join(layout, 'blobs', 'sha256'), { recursive: true })
    await writeFile(join(layout, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
    const layers: TestImageLayer[] = []
    const descriptors: object[] = []
    for (const [i, spec] of options.layers.entries()) {
      const tar = join(work, `layer${i}.tar`)
      await run('tar', ['--sort=name', '--numeric-owner', ...(spec.tarArgs ?? []), '-C', spec.files, '-cf', tar, '.'])
      const diffId = `sha256:${sha256(await readFile(tar))}`
      const annotations: Record<string, string> = {}
      let tocDigest: string | undefined
      let blobPath: string
      if (options.estargz) {
        blobPath = join(work, `layer${i}.blob`)
        const args = ['build', tar, blobPath, '--gzip-level', String(options.gzipLevel ?? 9)]
        if (spec.prioritized !== undefined) args.push('--prioritized', spec.prioritized.join(','))
        const { stdout } = await run(oraclePath(), args)
        for (const m of stdout.matchAll(/^annotation: ([^=]+)=(.*)$/gm)) annotations[m[1]!] = m[2]!
        tocDigest = /^toc-digest: (\S+)$/m.exec(stdout)?.[1]
        const key = 'containerd.io/snapshot/stargz/toc.digest'
        if (options.omitTocAnnotation === true) delete annotations[key]
        if (options.tocAnnotation !== undefined) annotations[key] = options.tocAnnotation
      } else if ((options.plainCompression ?? 'gzip') === 'gzip') {
        await run('gzip', ['-n', '-6', tar])
        blobPath = `${tar}.gz`
      } else {
        blobPath = `${tar}.zst`
        await writeFile(blobPath, zstdCompressSync(await readFile(tar)))
      }
      const blob = await putBlob(layout, await readFile(blobPath))
      const zstd = !options.estargz && options.plainCompression === 'zstd'
      descriptors.push({
        mediaType: `application/vnd.oci.image.layer.v1.tar+${zstd ? 'zstd' : 'gzip'}`,
        ...blob,
        ...(Object.keys(annotations).length > 0 ? { annotations } : {})
      })
      layers.push({
        ...blob,
        diffId,
        ...(tocDigest !== undefined ? { tocDigest } : {}),
        annotations,
        ...(await hashFiles(spec.files))
      })
    }
    const config = await putBlob(
      layout,
      Buffer.from(
        JSON.stringify({
          architecture: 'amd64',
          os: 'linux',
          config: {},
          rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) }
        })
      )
    )
    const manifest = await putBlob(
      layout,
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
          layers: descriptors
        })
      )
    )
    const tag = options.tag ?? 'latest'
    await writeFile(
      join(layout, 'index.json'),
      JSON.stringify({
        schemaVersion: 2,
        manifests: [
          {
            mediaType: 'application/vnd.oci.image.manifest.v1+json',
            ...manifest,
            annotations: { 'org.opencontainers.image.ref.name': tag }
          }
        ]
      })
    )
    const ref = `${options.registry}/${options.repository ?? 'test/image'}:${tag}`
    await run('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `oci:${layout}:${tag}`, `docker://${ref}`])
    return { ref, digest: manifest.digest, layers }
  } finally {
    await rm(work, { recursive: true, force: true })
  }
}

/** A directory of real files for test layers: small text files, a multi-chunk file, an empty file, a symlink. */
export async function makeTestTree(root: string, options: { bigBytes?: number; seed?: number } = {}): Promise<string> {
  await mkdir(join(root, 'etc'), { recursive: true })
  await mkdir(join(root, 'usr', 'bin'), { recursive: true })
  await mkdir(join(root, 'data'), { recursive: true })
  const seed = options.seed ?? 1
  for (let i = 0; i < 20; i++) {
    await writeFile(join(root, 'etc', `conf${i}.txt`), `seed ${seed} file ${i}\n`.repeat(1 + i * 37))
  }
  // Deterministic, incompressible-ish bytes: a multi-chunk file (the reference chunks at 4 MiB).
  const size = options.bigBytes ?? 9 * 1024 * 1024 + 123
  const words = new Uint32Array(Math.ceil(size / 4))
  let x = seed >>> 0
  for (let i = 0; i < words.length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0
    words[i] = x
  }
  const big = Buffer.from(words.buffer, 0, size)
  await writeFile(join(root, 'usr', 'bin', 'tool'), big)
  await writeFile(join(root, 'data', 'empty'), '')
  await run('ln', ['-sf', '../usr/bin/tool', join(root, 'etc', 'tool-link')])
  const s = await stat(join(root, 'usr', 'bin', 'tool'))
  if (s.size !== big.length) throw new Error('test tree: short write')
  return root
}
