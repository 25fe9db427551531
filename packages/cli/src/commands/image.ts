import { TOC_DIGEST_ANNOTATION } from '@strata/base'
import {
  type ConvertEvent,
  convertImage,
  createRegistryClient,
  type Descriptor,
  formatPlatform,
  openImageRepo,
  parseReference,
  type RegistryClient
} from '@strata/registry'
import { MAX_FOOTER_SIZE, openLayer, parseFooter } from '@strata/stargz'
import { type Command, type OptionSpec, type Options, UsageError } from '../command.js'
import { parseCredentials } from '../credentials.js'
import { formatBytes, type Output, type Progress } from '../output.js'
import { builderSettings, chunkSizeOption, prioritizedFileOption } from './build-options.js'

const registryOptions: Record<string, OptionSpec> = {
  'insecure-registry': {
    type: 'string',
    multiple: true,
    value: 'HOST',
    description: 'talk plain HTTP to this registry host[:port] (loopback registries always are)'
  },
  creds: {
    type: 'string',
    multiple: true,
    value: '[HOST=]USER:PASS',
    description: 'credentials for HOST, or for the registries named (else ~/.docker/config.json)'
  },
  platform: {
    type: 'string',
    value: 'OS/ARCH[/VARIANT]',
    description: 'platform to pick from a multi-platform index, e.g. linux/arm64'
  },
  json: { type: 'boolean', description: 'print one JSON object' }
}

/** A malformed image reference on the command line is a usage error (exit 2). */
function checkReference(name: string): void {
  if (name.startsWith('oci:')) return
  try {
    parseReference(name)
  } catch (err) {
    if ((err as Error).name === 'InvalidReferenceError') throw new UsageError((err as Error).message)
    throw err
  }
}

/** A client for the registries these references name, with --creds applied to each of them. */
function clientFor(opts: Options, references: string[]): RegistryClient {
  for (const r of references) checkReference(r)
  const insecure = (opts['insecure-registry'] as string[] | undefined) ?? []
  const named = references.filter((r) => !r.startsWith('oci:')).map((r) => parseReference(r).registry)
  const credentials = parseCredentials((opts.creds as string[] | undefined) ?? [], named)
  return createRegistryClient({ insecure, credentials })
}

interface LayerInfo {
  digest: string
  size: number
  mediaType: string
  estargz: boolean
  format?: string
  tocDigest?: string
  /** Where the eStargz verdict comes from: the manifest annotation or the blob's footer. */
  from?: 'annotation' | 'footer'
}

/** eStargz from the TOC-digest annotation, else from a Range read of the blob's last bytes (and its TOC). */
async function probeLayer(client: RegistryClient, ref: string, l: Descriptor, signal: AbortSignal): Promise<LayerInfo> {
  const info: LayerInfo = { digest: l.digest, size: l.size, mediaType: l.mediaType, estargz: false }
  const toc = l.annotations?.[TOC_DIGEST_ANNOTATION]
  if (toc !== undefined) return { ...info, estargz: true, format: 'estargz', tocDigest: toc, from: 'annotation' }
  if (l.size < 47) return info
  const blob = client.blob(ref, l, undefined, { deadline: true, what: 'the footer and TOC' })
  const tailLength = Math.min(MAX_FOOTER_SIZE, l.size)
  const tail = await blob.readAt(l.size - tailLength, tailLength, { signal })
  try {
    parseFooter(tail, l.size)
  } catch (err) {
    if ((err as Error).name === 'InvalidFooterError') return info
    throw err
  }
  const layer = await openLayer(blob, { signal })
  return {
    ...info,
    estargz: layer.format === 'estargz',
    format: layer.format,
    tocDigest: layer.tocDigest,
    from: 'footer'
  }
}

const inspectCommand: Command = {
  name: 'inspect',
  summary: "show an image's manifest and layers, and which layers are eStargz",
  usage: 'IMAGE',
  description: `Resolves IMAGE (a tag or digest; an index is narrowed to one platform, this machine's unless
--platform says otherwise) and lists its layers with sizes and media types. A layer is eStargz when the
manifest carries its TOC digest (annotation ${TOC_DIGEST_ANNOTATION}); without the annotation the last bytes of
the blob are read to look for an eStargz footer, and the TOC digest is computed from the TOC.

Examples:
  p2pctl inspect ubuntu:24.04
  p2pctl inspect localhost:5000/app:1 --platform linux/arm64 --json`,
  options: registryOptions,
  args: { min: 1, max: 1 },
  async run({ args, opts, out, signal }) {
    const name = args[0]!
    const client = clientFor(opts, [name])
    const platform = typeof opts.platform === 'string' ? opts.platform : undefined
    const image = await client.getImage(name, { signal, ...(platform !== undefined ? { platform } : {}) })
    const layers: LayerInfo[] = []
    for (const l of image.layers) layers.push(await probeLayer(client, name, l, signal))
    const result = {
      image: parseReference(name).toString(),
      ...(image.index !== undefined ? { index: image.index.digest, 'index-media-type': image.index.mediaType } : {}),
      ...(image.index !== undefined
        ? {
            platforms: (image.index.manifest as { manifests: Descriptor[] }).manifests
              .filter((d) => d.platform !== undefined)
              .map((d) => formatPlatform(d.platform!))
              .join(', ')
          }
        : {}),
      ...(image.platform !== undefined ? { platform: formatPlatform(image.platform) } : {}),
      digest: image.digest,
      'media-type': image.mediaType,
      config: image.config.digest,
      layers: layers.length,
      estargz: `${layers.filter((l) => l.estargz).length}/${layers.length}`
    }
    if (out.json) {
      out.printJson({ ...result, layers })
      return 0
    }
    out.fields(result)
    for (const [i, l] of layers.entries()) {
      const kind = l.estargz
        ? `eStargz toc ${l.tocDigest} (from ${l.from})`
        : l.format !== undefined
          ? `${l.format} toc ${l.tocDigest} (from footer)`
          : 'not eStargz'
      out.print(`layer ${i}: ${l.digest} ${formatBytes(l.size)} ${l.mediaType} ${kind}`)
    }
    return 0
  }
}

/** Turns convert's events into progress bars (on a terminal) or occasional plain lines. */
function reporter(out: Output): (e: ConvertEvent) => void {
  const bars = new Map<string, Progress>()
  const short = (d: string) => d.slice(7, 19)
  const done = (key: string, message: string) => {
    const bar = bars.get(key)
    bars.delete(key)
    if (bar !== undefined) bar.finish(message)
    else out.info(message)
  }
  return (e) => {
    switch (e.type) {
      case 'image':
        out.info(`image ${e.digest}${e.platform !== undefined ? ` (${e.platform})` : ''}: ${e.layers} layers`)
        break
      case 'download': {
        let bar = bars.get(`dl ${e.digest}`)
        if (bar === undefined) {
          bar = out.progress(`download ${short(e.digest)}`, e.size)
          bars.set(`dl ${e.digest}`, bar)
        }
        bar.update(e.bytes)
        if (e.bytes >= e.size) done(`dl ${e.digest}`, `downloaded ${short(e.digest)} (${formatBytes(e.size)})`)
        break
      }
      case 'convert-start':
        bars.set(`cv ${e.digest}`, out.progress(`convert ${short(e.digest)}`))
        break
      case 'convert':
        bars.get(`cv ${e.digest}`)?.update(e.bytes)
        break
      case 'layer':
        done(
          `cv ${e.layer.sourceDigest}`,
          e.layer.converted
            ? `layer ${short(e.layer.sourceDigest)} -> ${short(e.layer.digest)} eStargz (${formatBytes(e.layer.size)}, toc ${short(e.layer.tocDigest)})`
            : `layer ${short(e.layer.sourceDigest)} is eStargz already: kept`
        )
        break
      case 'skip':
        out.info(`skipped ${short(e.digest)}: ${e.reason}`)
        break
      case 'write':
        out.info(`writing ${e.what} ${short(e.digest)}`)
        break
    }
  }
}

const convertCommand: Command = {
  name: 'convert',
  summary: 'convert an image (every layer, every platform) to eStargz',
  usage: 'SRC DST',
  description: `Reads SRC, converts each layer that is not eStargz yet with the stargz builder, and writes the
result to DST: layers as eStargz (media type application/vnd.oci.image.layer.v1.tar+gzip with the TOC digest
and uncompressed size annotations), configs with the new diff_ids, then the manifest, then (for a
multi-platform SRC) the index under DST's tag. Layers that are eStargz already are kept as they are.
SRC and DST are registry references or OCI layouts (oci:DIR[:TAG]). Everything is built in temporary files
first ($TMPDIR, about twice the image's size): if anything fails, nothing is written to DST.

Examples:
  p2pctl convert localhost:5000/app:1 localhost:5000/app:1-esgz
  p2pctl convert docker.io/library/python:3.12 oci:/tmp/python:esgz --platform linux/amd64
  p2pctl convert registry.example.com/app:1 registry.example.com/app:1-esgz --prioritized-file start.txt`,
  options: {
    ...registryOptions,
    platform: {
      type: 'string',
      value: 'OS/ARCH[/VARIANT]',
      description: 'convert only this platform of a multi-platform index (default: all)'
    },
    'chunk-size': chunkSizeOption,
    'prioritized-file': prioritizedFileOption(
      'file with paths to put first (one per line), each in the topmost layer that has it'
    )
  },
  args: { min: 2, max: 2 },
  async run({ args, opts, out, signal }) {
    const [srcName, dstName] = args as [string, string]
    const { chunkSize, prioritizedFiles } = await builderSettings(opts)
    const client = clientFor(opts, [srcName, dstName])
    const src = openImageRepo(srcName, client)
    const dst = openImageRepo(dstName, client)
    const result = await convertImage(src, dst, {
      signal,
      ...(typeof opts.platform === 'string' ? { platform: opts.platform } : {}),
      ...(chunkSize !== undefined ? { chunkSize } : {}),
      ...(prioritizedFiles !== undefined ? { prioritizedFiles } : {}),
      ...(out.json ? {} : { onEvent: reporter(out) })
    })
    if (out.json) {
      out.printJson(result)
      return 0
    }
    const layers = result.images.flatMap((i) => i.layers)
    out.fields({
      source: result.source,
      destination: result.destination,
      digest: result.digest,
      'media-type': result.mediaType,
      images: result.images.length,
      'layers-converted': layers.filter((l) => l.converted).length,
      'layers-kept': layers.filter((l) => !l.converted).length
    })
    return 0
  }
}

/** `p2pctl inspect` and `p2pctl convert`: whole images in registries and OCI layouts. */
export const imageCommands: Command[] = [inspectCommand, convertCommand]
