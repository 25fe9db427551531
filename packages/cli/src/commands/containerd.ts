import { join } from 'node:path'
import { containerdConfig } from '@strata/snapshotter'
import { type Command, UsageError } from '../command.js'

/** `p2pctl containerd-config`: the config.toml fragment that makes containerd use p2pd as its snapshotter. */
export const containerdConfigCommand: Command = {
  name: 'containerd-config',
  summary: "print the containerd config.toml fragment that makes p2pd containerd's snapshotter",
  description: `Prints the proxy plugin (p2pd's --snapshotter-socket) and the CRI settings that make CRI pass the
image and layer of every unpack to the snapshotter as labels, which lets strata serve layers lazily. Merge it
into /etc/containerd/config.toml and restart containerd; p2pd must run with the same --snapshotter-socket.

Examples:
  p2pctl containerd-config >> /etc/containerd/config.toml
  p2pctl containerd-config --containerd 2 --snapshotter-socket /run/strata/snapshotter.sock`,
  options: {
    'snapshotter-socket': {
      type: 'string',
      value: 'PATH',
      description: "p2pd's --snapshotter-socket (default: $STRATA_SNAPSHOTTER_SOCKET or /run/strata/snapshotter.sock)"
    },
    name: { type: 'string', value: 'NAME', description: 'the snapshotter name in containerd (default: strata)' },
    containerd: {
      type: 'string',
      value: '1|2',
      description: "containerd's major version (default: 1, for 1.6 and 1.7)"
    },
    'data-dir': {
      type: 'string',
      value: 'DIR',
      description: "p2pd's --data-dir, for the plugin's root in 2.x (default: $STRATA_DATA_DIR or /var/lib/strata)"
    },
    'no-cri': { type: 'boolean', description: 'leave CRI out (ctr and other clients only)' }
  },
  run({ opts, out }) {
    const version = (opts.containerd as string | undefined) ?? '1'
    if (version !== '1' && version !== '2') throw new UsageError(`--containerd must be 1 or 2, not '${version}'`)
    const socket =
      (opts['snapshotter-socket'] as string | undefined) ??
      process.env.STRATA_SNAPSHOTTER_SOCKET ??
      '/run/strata/snapshotter.sock'
    if (!socket.startsWith('/')) throw new UsageError('--snapshotter-socket must be an absolute path')
    const dataDir = (opts['data-dir'] as string | undefined) ?? process.env.STRATA_DATA_DIR ?? '/var/lib/strata'
    try {
      out.print(
        containerdConfig({
          socket,
          containerd: version === '1' ? 1 : 2,
          root: join(dataDir, 'snapshotter'),
          cri: opts['no-cri'] !== true,
          ...(opts.name !== undefined && { name: opts.name as string })
        }).trimEnd()
      )
    } catch (err) {
      throw new UsageError((err as Error).message)
    }
    return 0
  }
}
