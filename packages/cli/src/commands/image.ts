import type { Command } from '../command.js'

/** `p2pctl inspect` and `p2pctl convert`: whole images in registries and OCI layouts. */
export const imageCommands: Command[] = []
