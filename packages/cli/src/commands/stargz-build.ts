import { randomBytes } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { open, rename, stat, unlink } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { buildEstargz } from '@strata/stargz'
import { type Command, parseInteger, UsageError } from '../command.js'
import { builderSettings, chunkSizeOption, prioritizedFileOption } from './build-options.js'

/** `p2pctl stargz build`: converts one tar layer into an eStargz blob, as the seed's stargzify does. */
export const buildCommand: Command = {
  name: 'build',
  summary: 'convert a tar layer into an eStargz blob',
  usage: 'IN.tar[.gz] OUT',
  description: `Reads a layer tar (plain or gzipped) and writes an eStargz blob to OUT, then prints the values a
manifest needs: the TOC digest (annotation containerd.io/snapshot/stargz/toc.digest), the DiffID, the
uncompressed size (annotation io.containers.estargz.uncompressed-size) and the blob digest.
OUT appears only when the build succeeded. The input is spooled to $TMPDIR while building.

Examples:
  p2pctl stargz build layer.tar layer.esgz
  p2pctl stargz build layer.tar.gz layer.esgz --prioritized-file startup-files.txt --json`,
  options: {
    'chunk-size': chunkSizeOption,
    'prioritized-file': prioritizedFileOption(
      'file with paths to put first (one per line), e.g. what the workload reads at start-up'
    ),
    'gzip-level': { type: 'string', value: 'N', description: 'gzip level 0-9 (default: 9, as the reference)' },
    json: { type: 'boolean', description: 'print one JSON object' }
  },
  args: { min: 2, max: 2 },
  async run({ args, opts, out, signal }) {
    const [input, output] = args as [string, string]
    const { chunkSize, prioritizedFiles } = await builderSettings(opts)
    const gzipLevel =
      typeof opts['gzip-level'] === 'string' ? parseInteger(opts['gzip-level'], '--gzip-level', 0, 9) : undefined

    const size = await inputSize(input)
    const tmp = join(dirname(output), `.${basename(output)}.${randomBytes(4).toString('hex')}.tmp`)
    const file = await open(tmp, 'wx').catch((err: Error) => {
      throw new Error(`cannot create ${output}: ${err.message}`, { cause: err })
    })
    const progress = out.stderr.isTTY === true && !out.json ? out.progress(`building ${output}`, size) : undefined
    try {
      const result = await buildEstargz(createReadStream(input), file.createWriteStream({ flush: true }), {
        chunkSize,
        gzipLevel,
        prioritizedFiles,
        signal,
        onProgress: (n) => progress?.update(n)
      })
      await rename(tmp, output)
      progress?.finish()
      out.fields({
        'toc-digest': result.tocDigest,
        'diff-id': result.diffId,
        'uncompressed-size': result.uncompressedSize,
        'blob-digest': result.blobDigest
      })
    } catch (err) {
      await unlink(tmp).catch(() => {})
      throw err
    }
    return 0
  }
}

/** The input's size when it is a plain tar (the progress total); undefined for gzip, whose tar size is unknown. */
async function inputSize(path: string): Promise<number | undefined> {
  const st = await stat(path).catch((err: Error) => {
    throw new Error(`cannot read input ${path}: ${err.message}`, { cause: err })
  })
  if (!st.isFile()) throw new UsageError(`input ${path} is not a regular file`)
  return path.endsWith('.gz') ? undefined : st.size
}
