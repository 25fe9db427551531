import { readFile } from 'node:fs/promises'
import { type OptionSpec, type Options, parseBytes, UsageError } from '../command.js'

/** `--chunk-size`, shared by `stargz build` and `convert`. */
export const chunkSizeOption: OptionSpec = {
  type: 'string',
  value: 'N',
  description: 'largest chunk of a file per gzip member, bytes or 4MiB-style (default: 4MiB)'
}

/** `--prioritized-file LIST`: one path per line, e.g. what `p2p-mount --record` wrote. */
export function prioritizedFileOption(description: string): OptionSpec {
  return { type: 'string', value: 'LIST', description }
}

/** The builder settings both commands take from their options. */
export async function builderSettings(
  opts: Options
): Promise<{ chunkSize: number | undefined; prioritizedFiles: string[] | undefined }> {
  const chunkSize = typeof opts['chunk-size'] === 'string' ? parseBytes(opts['chunk-size'], '--chunk-size') : undefined
  if (chunkSize === 0) throw new UsageError('--chunk-size must be at least 1 byte')
  const list = opts['prioritized-file']
  return { chunkSize, prioritizedFiles: typeof list === 'string' ? await readList(list) : undefined }
}

async function readList(path: string): Promise<string[]> {
  const text = await readFile(path, 'utf8').catch((err: Error) => {
    throw Object.assign(new Error(`cannot read the prioritized file list ${path}: ${err.message}`, { cause: err }), {
      hint: 'pass a file with one path per line, e.g. one written by p2p-mount --record'
    })
  })
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
}
