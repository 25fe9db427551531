// The containerd configuration an operator adds so that containerd uses p2pd as its snapshotter: the proxy
// plugin (the socket p2pd serves with --snapshotter-socket), and the settings that make CRI (and, in 2.x, the
// transfer service) pass the image and layer of every Prepare as labels, which is what lets strata serve a layer
// lazily instead of containerd downloading and unpacking it.

export interface ContainerdConfigOptions {
  /** p2pd's --snapshotter-socket. */
  socket: string
  /** The snapshotter's name in containerd (`ctr --snapshotter NAME`, CRI's `snapshotter`). Default `strata`. */
  name?: string
  /** containerd's major version: 1 (1.6, 1.7: config version 2) or 2 (config version 3). Default 1. */
  containerd?: 1 | 2
  /** p2pd's snapshotter directory, for the plugin's `root` export (2.x). */
  root?: string
  /** Also make CRI unpack with strata (default true). */
  cri?: boolean
}

const quote = (s: string) => JSON.stringify(s)

/** The TOML fragment (with comments) to merge into containerd's config.toml. */
export function containerdConfig(options: ContainerdConfigOptions): string {
  const name = options.name ?? 'strata'
  if (!/^[A-Za-z0-9_-]+$/.test(name))
    throw new Error(`snapshotter name ${quote(name)}: letters, digits, '_' and '-' only`)
  const cri = options.cri !== false
  if ((options.containerd ?? 1) === 1) {
    return `# strata: p2pd serves containerd's snapshots API (p2pd --snapshotter-socket ${options.socket}).
# Merge into /etc/containerd/config.toml (version = 2, containerd 1.6 and 1.7), then restart containerd.
# ctr: ctr images pull --snapshotter ${name} IMAGE, ctr run --snapshotter ${name} IMAGE ID CMD
[proxy_plugins]
  [proxy_plugins.${name}]
    type = "snapshot"
    address = ${quote(options.socket)}
${
  cri
    ? `
# CRI (Kubernetes): unpack with strata, and pass the image reference and layer digests to it as snapshot
# labels (containerd.io/snapshot/cri.*): strata then serves eStargz layers lazily and shares their chunks
# with its peers, and containerd downloads no layer blob. Without labels strata unpacks layers as overlayfs does.
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = ${quote(name)}
  disable_snapshot_annotations = false
`
    : ''
}`
  }
  return `# strata: p2pd serves containerd's snapshots API (p2pd --snapshotter-socket ${options.socket}).
# Merge into /etc/containerd/config.toml (version = 3, containerd 2.x), then restart containerd.
[proxy_plugins]
  [proxy_plugins.${name}]
    type = "snapshot"
    address = ${quote(options.socket)}
  [proxy_plugins.${name}.exports]
${options.root !== undefined ? `    root = ${quote(options.root)}\n` : ''}    # The transfer service (ctr pull, and CRI from 2.1) passes the image and layer as labels only to
    # snapshotters that ask for them like this.
    enable_remote_snapshot_annotations = "true"

# Unpack with strata in the transfer service (ctr images pull; CRI pulls from containerd 2.1).
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux"
  snapshotter = ${quote(name)}
${
  cri
    ? `
# CRI (Kubernetes) unpacks with strata. disable_snapshot_annotations = false passes the labels in CRI's own
# pull (2.0 pulls that way always; in 2.1 the setting makes CRI pull so instead of through the transfer service,
# which would pass the same labels by the unpack_config above).
[plugins."io.containerd.cri.v1.images"]
  snapshotter = ${quote(name)}
  disable_snapshot_annotations = false
`
    : ''
}`
}
