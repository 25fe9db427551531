import type { Command } from '../command.js'
import { buildCommand } from './stargz-build.js'

/** `p2pctl stargz ...`: build, verify and inspect single eStargz / stargz / zstd:chunked blobs. */
export const stargzCommand: Command = {
  name: 'stargz',
  summary: 'build, verify and inspect eStargz layer blobs',
  subcommands: [buildCommand]
}
