// A podman with storage of its own (graph root, run root, an additional layer store), for one test file.
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from '@test/tools.js'

export interface Podman {
  /** Runs `podman ARGS` with this storage; rejects with its stderr when it fails. */
  podman(args: string[], options?: { timeout?: number }): Promise<{ stdout: string; stderr: string }>
  /** Removes its containers and images, then unmounts what its graph root left mounted. */
  stop(): Promise<void>
}

/** podman's storage.conf with `additionallayerstores = ["STORE:ref"]`, and a private graph root under `dir`. */
export async function startPodman(dir: string, layerStore: string): Promise<Podman> {
  await mkdir(dir, { recursive: true })
  const conf = join(dir, 'storage.conf')
  await writeFile(
    conf,
    `[storage]
driver = "overlay"
graphroot = "${join(dir, 'graph')}"
runroot = "${join(dir, 'run')}"

[storage.options]
additionallayerstores = ["${layerStore}:ref"]
`
  )
  // containers.conf: no cgroup manager or journald here; this sandbox's rlimits are lower than podman's defaults.
  await writeFile(
    join(dir, 'containers.conf'),
    `[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "${join(dir, 'events.log')}"
`
  )
  const env = { ...process.env, CONTAINERS_STORAGE_CONF: conf, CONTAINERS_CONF: join(dir, 'containers.conf') }
  const podman = (args: string[], options: { timeout?: number } = {}) =>
    run('podman', args, { env, timeout: options.timeout ?? 120_000 })
  return {
    podman,
    async stop() {
      await podman(['rm', '--all', '--force']).catch(() => {})
      await podman(['rmi', '--all', '--force']).catch(() => {})
      await run('bash', [
        '-c',
        `grep -o ' ${dir}/[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l`
      ]).catch(() => {})
    }
  }
}
