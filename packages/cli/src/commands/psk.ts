import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import type { Command } from '../command.js'

/** A libp2p private-network key (the swarm.key format every node's --psk-file reads). */
export function newSwarmKey(): string {
  return `/key/swarm/psk/1.0.0/\n/base16/\n${randomBytes(32).toString('hex')}\n`
}

/** `p2pctl psk new`: make the pre-shared key that closes a cluster to nodes without it. */
export const pskCommand: Command = {
  name: 'psk',
  summary: 'pre-shared keys that close a cluster (p2pd --psk-file)',
  subcommands: [
    {
      name: 'new',
      summary: 'print a new random pre-shared key (or write it to --out with mode 0600)',
      description: `Copy the same key to every node and start p2pd with --psk-file: nodes without it cannot connect.

Examples:
  p2pctl psk new > /etc/strata/swarm.key && chmod 600 /etc/strata/swarm.key
  p2pctl psk new --out /etc/strata/swarm.key`,
      options: {
        out: { type: 'string', value: 'FILE', description: 'write the key to FILE (mode 0600; refuses to overwrite)' }
      },
      run: async ({ opts, out }) => {
        const key = newSwarmKey()
        if (typeof opts.out !== 'string') {
          out.print(key)
          return 0
        }
        await writeFile(opts.out, key, { mode: 0o600, flag: 'wx' }).catch((err: NodeJS.ErrnoException) => {
          throw Object.assign(
            new Error(`cannot write the key to ${opts.out}: ${err.code ?? err.message}`, { cause: err }),
            {
              hint:
                err.code === 'EEXIST' ? 'the file exists: remove it first if you mean to replace the key' : undefined
            }
          )
        })
        out.info(`wrote a new pre-shared key to ${opts.out}`)
        return 0
      }
    }
  ]
}
