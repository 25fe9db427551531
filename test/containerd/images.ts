// Runnable test images: a root file system made of this machine's own programs (scripts/lib/host-rootfs.sh),
// as eStargz (the reference builder, `oracle build`) or plain gzip layers, with an image config that says
// what to run, written as an OCI layout and pushed with skopeo.
import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { oraclePath, repoRoot, run } from '@test/tools.js'

export interface RunnableImageOptions {
  /** host:port of the registry. */
  registry: string
  repository: string
  tag?: string
  estargz: boolean
  /** Programs of this machine in the first layer, with their libraries. */
  programs: string[]
  /** Directories of this machine copied whole into the first layer (e.g. a language's standard library). */
  hostDirs?: string[]
  /** Files of the second layer: path -> content (a mode may be given as `[content, mode]`). */
  files?: Record<string, string | [string, number]>
  /** Host programs copied into the second layer: path in the image -> [host program, mode]. */
  copies?: Record<string, [string, number]>
  /** Paths (relative) put first in their eStargz layer, to be prefetched. */
  prioritized?: string[]
  entrypoint?: string[]
  cmd?: string[]
}

export interface RunnableImage {
  ref: string
  digest: string
  /** Layer digests, lowest first. */
  layers: string[]
  /** Compressed sizes of the layers. */
  sizes: number[]
}

const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex')

export async function buildRunnableImage(o: RunnableImageOptions): Promise<RunnableImage> {
  const work = await mkdtemp(join(tmpdir(), 'strata-runnable-'))
  try {
    const layout = join(work, 'oci')
    await mkdir(join(layout, 'blobs', 'sha256'), { recursive: true })
    const put = async (bytes: Uint8Array) => {
      const hex = sha256(bytes)
      await writeFile(join(layout, 'blobs', 'sha256', hex), bytes)
      return { digest: `sha256:${hex}`, size: bytes.byteLength }
    }
    const base = join(work, 'base')
    await run('bash', [join(repoRoot, 'scripts', 'lib', 'host-rootfs.sh'), base, ...o.programs])
    for (const dir of o.hostDirs ?? []) {
      await mkdir(join(base, dir, '..'), { recursive: true })
      await run('cp', ['-a', dir, join(base, dir, '..')])
    }
    const trees = [base]
    if (o.files !== undefined || o.copies !== undefined) {
      const top = join(work, 'top')
      await mkdir(top)
      for (const [path, spec] of Object.entries(o.files ?? {})) {
        const [content, mode] = typeof spec === 'string' ? [spec, 0o644] : spec
        await mkdir(join(top, path, '..'), { recursive: true })
        await writeFile(join(top, path), content)
        await chmod(join(top, path), mode)
      }
      for (const [path, [program, mode]] of Object.entries(o.copies ?? {})) {
        const { stdout } = await run('bash', ['-c', `command -v ${program}`])
        await mkdir(join(top, path, '..'), { recursive: true })
        await copyFile(stdout.trim(), join(top, path))
        await chmod(join(top, path), mode)
      }
      trees.push(top)
    }
    const descriptors: object[] = []
    const diffIds: string[] = []
    const layers: string[] = []
    const sizes: number[] = []
    for (const [i, tree] of trees.entries()) {
      const tar = join(work, `layer${i}.tar`)
      await run('tar', ['--sort=name', '--numeric-owner', '--owner=0', '--group=0', '-C', tree, '-cf', tar, '.'])
      diffIds.push(`sha256:${sha256(await readFile(tar))}`)
      const annotations: Record<string, string> = {}
      let blobPath = `${tar}.gz`
      if (o.estargz) {
        blobPath = join(work, `layer${i}.esgz`)
        const args = ['build', tar, blobPath]
        // Each layer puts first those of the prioritized files it has.
        const prioritized = (o.prioritized ?? []).filter((p) => existsSync(join(tree, p)))
        if (prioritized.length > 0) args.push('--prioritized', prioritized.join(','))
        const { stdout } = await run(oraclePath(), args)
        for (const m of stdout.matchAll(/^annotation: ([^=]+)=(.*)$/gm)) annotations[m[1]!] = m[2]!
      } else {
        await run('gzip', ['-n', '-6', tar])
      }
      const blob = await put(await readFile(blobPath))
      layers.push(blob.digest)
      sizes.push(blob.size)
      descriptors.push({
        mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
        ...blob,
        ...(Object.keys(annotations).length > 0 && { annotations })
      })
    }
    const config = await put(
      Buffer.from(
        JSON.stringify({
          architecture: 'amd64',
          os: 'linux',
          config: {
            Env: ['PATH=/usr/local/bin:/usr/bin:/bin'],
            ...(o.entrypoint !== undefined && { Entrypoint: o.entrypoint }),
            ...(o.cmd !== undefined && { Cmd: o.cmd })
          },
          rootfs: { type: 'layers', diff_ids: diffIds }
        })
      )
    )
    const manifest = await put(
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
          layers: descriptors
        })
      )
    )
    const tag = o.tag ?? 'latest'
    await writeFile(join(layout, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))
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
    const ref = `${o.registry}/${o.repository}:${tag}`
    await run('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `oci:${layout}:${tag}`, `docker://${ref}`])
    return { ref, digest: manifest.digest, layers, sizes }
  } finally {
    await rm(work, { recursive: true, force: true })
  }
}
