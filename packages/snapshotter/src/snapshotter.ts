// The snapshots themselves, with containerd's overlay semantics: a committed snapshot is a directory of a
// layer's files (unpacked into it by containerd's diff service through the mounts Prepare returned); an active
// snapshot is an overlay of its own upper and work directories over its parents, nearest first; a view is the
// same, read-only. A remote snapshot is a committed one with no directory: its layer and every layer below it
// are the merged-root FUSE mount of its image (see mounts.ts), which stands as one lower directory for the
// snapshots above it. Keys arrive namespaced by containerd and are only names here; directories are numbered.
import { existsSync } from 'node:fs'
import { chmod, lstat, mkdir, readdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { type AbortOptions, isSha256Digest } from '@strata/base'
import { type ImageSource, MergedMounts } from '@strata/mounts'
import {
  MountUnavailable,
  SnapshotExists,
  SnapshotInvalid,
  SnapshotNotFound,
  SnapshotPrecondition,
  SnapshotterRootError
} from './errors.js'
import { parseFilters } from './filters.js'
import {
  type ImageOpener,
  REMOTE_LABEL,
  type RemoteRequest,
  RemoteResolver,
  remoteRequest,
  SNAPSHOT_REF_LABEL
} from './remote.js'
import { type Kind, type RemoteLayer, type SnapshotRecord, SnapshotState } from './state.js'

/** A mount as containerd's `types.Mount` has it. */
export interface MountSpec {
  type: string
  source: string
  options: string[]
}

export interface SnapshotInfo {
  name: string
  parent: string
  kind: Kind
  labels: Record<string, string>
  /** Milliseconds since the epoch. */
  created: number
  updated: number
}

export interface Usage {
  size: number
  inodes: number
}

export interface SnapshotterInit {
  /** The snapshotter's directory (made root-only); its path must hold no ':' or ','. */
  root: string
  /** Where remote layers are read from: p2pd's node (openImage, fetcher) and the registry (configs). */
  source: ImageSource & ImageOpener
  /** Serve layers remotely when Prepare's labels allow it (default true); false: a plain overlay snapshotter. */
  remote?: boolean
  /** Prefetch the prioritized files of an image's eStargz layers when its first container is prepared (true). */
  prefetch?: boolean
  /**
   * Keep the merged roots across restarts of p2pd through a FUSE session holder (in `ROOT/fuse`), so that the
   * containers running on them keep their root file system (default true).
   */
  keepMounts?: boolean
  /** FUSE passthrough on the merged roots, where the kernel offers it (default on; p2pd --fuse-passthrough). */
  passthrough?: boolean
  log?: (message: string) => void
}

export class Snapshotter {
  readonly #root: string
  readonly #state: SnapshotState
  readonly #mounts: MergedMounts
  readonly #resolver: RemoteResolver | undefined
  readonly #log: (message: string) => void
  readonly #index: boolean
  #lock: Promise<void> = Promise.resolve()

  private constructor(init: SnapshotterInit, state: SnapshotState, mounts: MergedMounts) {
    this.#root = init.root
    this.#state = state
    this.#mounts = mounts
    this.#log = init.log ?? (() => {})
    this.#resolver = init.remote === false ? undefined : new RemoteResolver(init.source)
    // As containerd's overlay snapshotter: no inode index, which would tie upper directories to one lower.
    this.#index = existsSync('/sys/module/overlay/parameters/index')
  }

  /** Opens (or creates) the snapshotter's directory and records; detaches mounts a previous p2pd left. */
  static async open(init: SnapshotterInit): Promise<Snapshotter> {
    const root = init.root
    if (!root.startsWith('/') || /[:,]/.test(root)) {
      throw new SnapshotterRootError(
        root,
        "overlayfs takes no ':' or ',' in the paths of its directories, and they must be absolute",
        'give p2pd a --data-dir whose absolute path has neither'
      )
    }
    try {
      await mkdir(join(root, 'snapshots'), { recursive: true, mode: 0o700 })
      // Root-only: the layers' files keep their owners and setuid bits, which nobody else may reach through here.
      await chmod(root, 0o700)
    } catch (err) {
      throw new SnapshotterRootError(root, (err as Error).message, 'run p2pd as root', { cause: err })
    }
    const state = await SnapshotState.load(root)
    const mounts = new MergedMounts({
      dir: join(root, 'mounts'),
      source: init.source,
      log: init.log ?? (() => {}),
      ...(init.prefetch !== undefined && { prefetch: init.prefetch }),
      ...(init.passthrough !== undefined && { passthrough: init.passthrough }),
      ...(init.keepMounts !== false && { holderDir: join(root, 'fuse') })
    })
    const snapshotter = new Snapshotter(init, state, mounts)
    await mounts.recover(snapshotter.#neededRemotes())
    return snapshotter
  }

  /** Runs `fn` with the records to itself (changes and their save are one step). */
  async #locked<T>(fn: () => Promise<T> | T): Promise<T> {
    const before = this.#lock
    let done!: () => void
    this.#lock = new Promise((resolve) => {
      done = resolve
    })
    await before
    try {
      return await fn()
    } finally {
      done()
    }
  }

  #dir(record: SnapshotRecord): string {
    return join(this.#root, 'snapshots', String(record.id))
  }

  #get(key: string): SnapshotRecord {
    const record = this.#state.get(key)
    if (record === undefined) throw new SnapshotNotFound(key)
    return record
  }

  #checkNew(key: string, parent: string): void {
    if (key === '') throw new SnapshotInvalid('a snapshot key must not be empty')
    if (this.#state.get(key) !== undefined) throw new SnapshotExists(key)
    if (parent !== '') {
      const p = this.#state.get(parent)
      if (p === undefined) throw new SnapshotNotFound(parent, 'parent snapshot')
      if (p.kind !== 'committed')
        throw new SnapshotInvalid(`parent snapshot ${JSON.stringify(parent)} is not committed`)
    }
  }

  /**
   * An active snapshot over `parent`. When the labels name the image and layer and the layer can be served
   * remotely, no snapshot `key` is made: the snapshot containerd's `containerd.io/snapshot.ref` label names is
   * committed instead and this answers SnapshotExists (ALREADY_EXISTS), which tells containerd to skip the layer.
   */
  async prepare(
    key: string,
    parent: string,
    labels: Record<string, string>,
    options?: AbortOptions
  ): Promise<MountSpec[]> {
    await this.#locked(() => this.#checkNew(key, parent))
    const req = this.#resolver !== undefined ? remoteRequest(labels) : undefined
    if (req !== undefined) await this.#tryRemote(req, parent, labels, options)
    return this.#create('active', key, parent, labels, options)
  }

  /** A read-only view of `parent`. */
  async view(
    key: string,
    parent: string,
    labels: Record<string, string>,
    options?: AbortOptions
  ): Promise<MountSpec[]> {
    return this.#create('view', key, parent, labels, options)
  }

  async #create(
    kind: 'active' | 'view',
    key: string,
    parent: string,
    labels: Record<string, string>,
    options?: AbortOptions
  ): Promise<MountSpec[]> {
    const record = await this.#locked(async () => {
      this.#checkNew(key, parent)
      const now = Date.now()
      const r: SnapshotRecord = { id: this.#state.newId(), name: key, parent, kind, labels, created: now, updated: now }
      const dir = this.#dir(r)
      await mkdir(join(dir, 'fs'), { recursive: true, mode: 0o755 })
      if (kind === 'active') await mkdir(join(dir, 'work'), { mode: 0o700 })
      this.#state.put(r)
      await this.#state.save()
      return r
    })
    try {
      return await this.#mountsOf(record, options)
    } catch (err) {
      // containerd keeps no record of a failed Prepare: neither may we.
      await this.#locked(async () => {
        this.#state.delete(key)
        await this.#state.save()
      }).catch(() => {})
      await rm(this.#dir(record), { recursive: true, force: true }).catch(() => {})
      throw err
    }
  }

  /** Commits the remote snapshot `req.target` and throws SnapshotExists; returns when the layer must be unpacked. */
  async #tryRemote(
    req: RemoteRequest,
    parent: string,
    labels: Record<string, string>,
    options?: AbortOptions
  ): Promise<void> {
    const existing = this.#state.get(req.target)
    if (existing !== undefined) {
      if (existing.kind === 'committed' && existing.parent === parent) {
        throw new SnapshotExists(req.target, 'the layer is there already')
      }
      this.#log(`snapshotter: ${req.target} exists on another parent; unpacking layer ${req.layer} of ${req.ref}`)
      return
    }
    let remote: RemoteLayer
    try {
      remote = await this.#resolver!.resolve(req, this.#chainOf(parent), options)
    } catch (err) {
      this.#log(`snapshotter: unpacking layer ${req.layer} of ${req.ref}: ${(err as Error).message}`)
      return
    }
    const committed = await this.#locked(async () => {
      const again = this.#state.get(req.target)
      if (again !== undefined) return again.kind === 'committed' && again.parent === parent
      if (parent !== '' && this.#state.get(parent)?.kind !== 'committed') return false
      const now = Date.now()
      this.#state.put({
        id: this.#state.newId(),
        name: req.target,
        parent,
        kind: 'committed',
        labels: { ...labels, [REMOTE_LABEL]: 'true' },
        created: now,
        updated: now,
        remote
      })
      await this.#state.save()
      return true
    })
    if (committed) throw new SnapshotExists(req.target, `layer ${remote.index + 1} of ${remote.ref} is served remotely`)
  }

  /** The chain ID a committed snapshot holds: its own name for remote ones, else its snapshot.ref label. */
  #chainOf(name: string): string | undefined {
    if (name === '') return undefined
    const p = this.#state.get(name)
    if (p === undefined) return undefined
    if (p.remote !== undefined) return p.name
    const label = p.labels[SNAPSHOT_REF_LABEL]
    if (label !== undefined) return label
    const last = p.name.slice(p.name.lastIndexOf('/') + 1)
    return isSha256Digest(last) ? last : undefined
  }

  /** The lower directories of a snapshot over `parent`, nearest first. */
  async #lowers(parent: string, options?: AbortOptions): Promise<string[]> {
    const out: string[] = []
    for (const s of this.#state.chain(parent)) {
      if (s.remote !== undefined) {
        // The merged root holds this layer and all below it.
        out.push(
          await this.#mounts.ensure(s.id, s.remote, options).catch((err: unknown) => {
            // The Mounts service's MountUnavailableError is UNAVAILABLE to containerd, which retries.
            if ((err as Error).name === 'MountUnavailableError')
              throw new MountUnavailable((err as Error).message, { cause: err })
            throw err
          })
        )
        break
      }
      out.push(join(this.#dir(s), 'fs'))
    }
    return out
  }

  async #mountsOf(record: SnapshotRecord, options?: AbortOptions): Promise<MountSpec[]> {
    if (record.kind === 'committed') {
      throw new SnapshotPrecondition(`snapshot ${JSON.stringify(record.name)} is committed: it has no mounts`)
    }
    const lowers = await this.#lowers(record.parent, options)
    const dir = this.#dir(record)
    const index = this.#index ? ['index=off'] : []
    if (record.kind === 'active') {
      if (lowers.length === 0) return [{ type: 'bind', source: join(dir, 'fs'), options: ['rbind', 'rw'] }]
      return [
        {
          type: 'overlay',
          source: 'overlay',
          options: [
            ...index,
            `workdir=${join(dir, 'work')}`,
            `upperdir=${join(dir, 'fs')}`,
            `lowerdir=${lowers.join(':')}`
          ]
        }
      ]
    }
    if (lowers.length === 0) return [{ type: 'bind', source: join(dir, 'fs'), options: ['rbind', 'ro'] }]
    if (lowers.length === 1) return [{ type: 'bind', source: lowers[0]!, options: ['rbind', 'ro'] }]
    return [{ type: 'overlay', source: 'overlay', options: [...index, `lowerdir=${lowers.join(':')}`] }]
  }

  /** The mounts of an active snapshot or view (a remote parent's merged root is mounted again if need be). */
  async mounts(key: string, options?: AbortOptions): Promise<MountSpec[]> {
    return this.#mountsOf(this.#get(key), options)
  }

  async commit(name: string, key: string, labels: Record<string, string>): Promise<void> {
    await this.#locked(async () => {
      const active = this.#get(key)
      if (active.kind !== 'active') {
        throw new SnapshotPrecondition(`snapshot ${JSON.stringify(key)} is not active: only active ones commit`)
      }
      if (name === '') throw new SnapshotInvalid('a snapshot name must not be empty')
      if (this.#state.get(name) !== undefined) throw new SnapshotExists(name)
      const now = Date.now()
      this.#state.delete(key)
      this.#state.put({ ...active, name, kind: 'committed', labels, created: now, updated: now })
      await this.#state.save()
    })
  }

  async remove(key: string): Promise<void> {
    const record = await this.#locked(async () => {
      const r = this.#get(key)
      if (this.#state.hasChildren(key)) {
        throw new SnapshotPrecondition(`snapshot ${JSON.stringify(key)} has children: remove them first`)
      }
      this.#state.delete(key)
      await this.#state.save()
      return r
    })
    if (record.remote === undefined) {
      await rm(this.#dir(record), { recursive: true, force: true }).catch((err) => {
        this.#log(`snapshotter: cannot remove ${this.#dir(record)} (Cleanup tries again): ${err.message}`)
      })
    }
    await this.#releaseUnneeded()
  }

  /** The remote snapshots whose merged root some active snapshot or view stands on, by id. */
  #neededRemotes(): Map<number, RemoteLayer> {
    const needed = new Map<number, RemoteLayer>()
    for (const s of this.#state.all()) {
      if (s.kind === 'committed') continue
      const top = this.#state.chain(s.parent).find((p) => p.remote !== undefined)
      if (top !== undefined) needed.set(top.id, top.remote!)
    }
    return needed
  }

  #neededMounts(): Set<number> {
    return new Set(this.#neededRemotes().keys())
  }

  /** Unmounts the merged roots nothing stands on any more: the last snapshot over one was removed. */
  async #releaseUnneeded(): Promise<void> {
    // Asked again when each release runs: a snapshot prepared since may stand on the mount.
    const needed = (id: number) => this.#neededMounts().has(id)
    for (const id of this.#mounts.live()) if (!needed(id)) await this.#mounts.release(id, needed)
  }

  stat(key: string): SnapshotInfo {
    return toInfo(this.#get(key))
  }

  /**
   * Updates labels, the one mutable field: `labels` replaces them all (as does an empty mask), `labels.KEY` sets
   * or (absent from `info`) removes one.
   */
  async update(info: Pick<SnapshotInfo, 'name' | 'labels'>, paths: readonly string[]): Promise<SnapshotInfo> {
    return this.#locked(async () => {
      const record = this.#get(info.name)
      let labels = { ...record.labels }
      if (paths.length === 0) labels = { ...info.labels }
      for (const path of paths) {
        if (path === 'labels') labels = { ...info.labels }
        else if (path.startsWith('labels.')) {
          const k = path.slice('labels.'.length)
          if (info.labels[k] !== undefined) labels[k] = info.labels[k]
          else delete labels[k]
        } else throw new SnapshotInvalid(`the field ${JSON.stringify(path)} of a snapshot cannot be changed`)
      }
      // Whether a snapshot is remote is strata's to say, not a label's.
      if (record.remote !== undefined) labels[REMOTE_LABEL] = 'true'
      const updated = { ...record, labels, updated: Date.now() }
      this.#state.put(updated)
      await this.#state.save()
      return toInfo(updated)
    })
  }

  list(filters: readonly string[]): SnapshotInfo[] {
    const match = parseFilters(filters)
    return this.#state
      .all()
      .map(toInfo)
      .filter((i) => match(i))
  }

  /** Disk use of a snapshot's own directory; for a remote one, its layer's files as the TOC lists them. */
  async usage(key: string): Promise<Usage> {
    const record = this.#get(key)
    if (record.remote !== undefined) return { size: record.remote.size, inodes: record.remote.inodes }
    return diskUsage(join(this.#dir(record), 'fs'))
  }

  /** Removes what no record owns: snapshot directories left by an interrupted Remove, mounts nothing uses. */
  async cleanup(): Promise<void> {
    const dir = join(this.#root, 'snapshots')
    // Chosen under the lock (a Prepare makes its directory and record together there); ids are never reused, so
    // an orphan stays one while it is removed.
    const orphans = await this.#locked(async () => {
      const ids = new Set(this.#state.all().map((s) => s.id))
      return (await readdir(dir)).filter((name) => !(/^\d+$/.test(name) && ids.has(Number(name))))
    })
    for (const name of orphans) {
      await rm(join(dir, name), { recursive: true, force: true }).catch((err) => {
        this.#log(`snapshotter: cannot remove ${join(dir, name)}: ${err.message}`)
      })
    }
    await this.#mounts.prune((id) => this.#neededMounts().has(id))
  }

  /** Stops; the records stay, and so do the merged roots when a holder keeps them (see keepMounts). */
  async close(): Promise<void> {
    await this.#mounts.close()
  }
}

function toInfo(r: SnapshotRecord): SnapshotInfo {
  return {
    name: r.name,
    parent: r.parent,
    kind: r.kind,
    labels: { ...r.labels },
    created: r.created,
    updated: r.updated
  }
}

/** Bytes in use (allocated blocks) and inodes under `dir`, each hard-linked inode once, as containerd counts. */
async function diskUsage(dir: string): Promise<Usage> {
  const seen = new Set<string>()
  let size = 0
  const walk = async (path: string): Promise<void> => {
    const st = await lstat(path, { bigint: true }).catch(() => undefined)
    if (st === undefined) return
    const inode = `${st.dev}:${st.ino}`
    if (!seen.has(inode)) {
      seen.add(inode)
      size += Number(st.blocks) * 512
    }
    if (st.isDirectory()) {
      for (const name of await readdir(path).catch(() => [] as string[])) await walk(join(path, name))
    }
  }
  await walk(dir)
  return { size, inodes: seen.size }
}
