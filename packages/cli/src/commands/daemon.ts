import type { Command } from '../command.js'

/** `p2pctl status|peers|images|warm|gc`: talk to p2pd over its control socket. */
export const daemonCommands: Command[] = []
