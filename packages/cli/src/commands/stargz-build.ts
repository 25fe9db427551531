import type { Command } from '../command.js'

/** `p2pctl stargz build`: owned by the stargz builder. */
export const buildCommand: Command = {
  name: 'build',
  summary: 'convert a tar layer into an eStargz blob',
  usage: 'IN.tar[.gz] OUT',
  args: { min: 2, max: 2 }
}
