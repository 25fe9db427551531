import type { Command } from './command.js'
import { runCommand } from './command.js'
import { containerdConfigCommand } from './commands/containerd.js'
import { daemonCommands } from './commands/daemon.js'
import { imageCommands } from './commands/image.js'
import { pskCommand } from './commands/psk.js'
import { stargzCommand } from './commands/stargz.js'

/** The operator's tool. Each command group lives in its own file under commands/. */
export const p2pctl: Command = {
  name: 'p2pctl',
  summary: 'strata operator tool: eStargz build and inspection, conversion, status, warm-up, gc.',
  options: {
    socket: {
      type: 'string',
      value: 'PATH',
      description: "p2pd's control socket (default: $STRATA_SOCKET or /run/strata/p2pd.sock)"
    }
  },
  subcommands: [...daemonCommands, ...imageCommands, stargzCommand, pskCommand, containerdConfigCommand]
}

export function main(argv: string[]): Promise<number> {
  return runCommand(p2pctl, argv)
}
