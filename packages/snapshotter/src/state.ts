// The snapshotter's records, kept in one JSON file in its directory and replaced atomically (written beside,
// fsynced, renamed, directory fsynced) after every change: a p2pd killed at any point restarts with either the
// old or the new set of snapshots, never a torn one. Directories of snapshots are named by number, so no path
// handed to overlayfs holds the ':' or ',' of a containerd key.
import { open, readFile, rename, rm } from 'node:fs/promises'
import { join } from 'node:path'

export type Kind = 'view' | 'active' | 'committed'

/** What a remote snapshot stands for: layers 0..index of an image, served by a merged-root mount. */
export interface RemoteLayer {
  /** The reference the image is opened by (pinned to the manifest digest when containerd named it). */
  ref: string
  /** Manifest digest. */
  manifest: string
  /** This layer's blob digest. */
  layer: string
  /** Its index in the image, lowest 0. */
  index: number
  /** Bytes of the layer's files (its TOC), for Usage. */
  size: number
  /** Entries in the layer (its TOC), for Usage. */
  inodes: number
}

export interface SnapshotRecord {
  /** Directory number: `snapshots/<id>`; for a remote snapshot also its mount, `mounts/<id>`. */
  id: number
  name: string
  /** The parent's name, '' for none. */
  parent: string
  kind: Kind
  labels: Record<string, string>
  /** Milliseconds since the epoch. */
  created: number
  updated: number
  remote?: RemoteLayer
}

interface StateFile {
  version: 1
  nextId: number
  snapshots: SnapshotRecord[]
}

export class SnapshotState {
  readonly #file: string
  readonly #byName = new Map<string, SnapshotRecord>()
  #nextId = 1
  #saving: Promise<void> = Promise.resolve()

  private constructor(file: string) {
    this.#file = file
  }

  /** Reads the state file in `dir` (none yet: empty). */
  static async load(dir: string): Promise<SnapshotState> {
    const state = new SnapshotState(join(dir, 'state.json'))
    let text: string | undefined
    try {
      text = await readFile(state.#file, 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
    }
    if (text !== undefined) {
      const saved = JSON.parse(text) as StateFile
      if (saved.version !== 1) throw new Error(`${state.#file}: unknown state version ${String(saved.version)}`)
      state.#nextId = saved.nextId
      for (const s of saved.snapshots) state.#byName.set(s.name, s)
    }
    // A write that was cut short leaves its temporary file: nobody reads it.
    await rm(`${state.#file}.tmp`, { force: true })
    return state
  }

  get(name: string): SnapshotRecord | undefined {
    return this.#byName.get(name)
  }

  all(): SnapshotRecord[] {
    return [...this.#byName.values()]
  }

  /** Whether any snapshot has `name` as its parent. */
  hasChildren(name: string): boolean {
    for (const s of this.#byName.values()) if (s.parent === name) return true
    return false
  }

  /** The snapshot and its ancestors, nearest first. */
  chain(name: string): SnapshotRecord[] {
    const out: SnapshotRecord[] = []
    let next = name
    while (next !== '') {
      const s = this.#byName.get(next)
      if (s === undefined) break
      out.push(s)
      next = s.parent
    }
    return out
  }

  newId(): number {
    return this.#nextId++
  }

  put(record: SnapshotRecord): void {
    this.#byName.set(record.name, record)
  }

  delete(name: string): void {
    this.#byName.delete(name)
  }

  /** Writes the current records; saves run one after another, each writing what is current when it starts. */
  save(): Promise<void> {
    const next = this.#saving.then(() => this.#write())
    this.#saving = next.catch(() => {})
    return next
  }

  async #write(): Promise<void> {
    const body: StateFile = { version: 1, nextId: this.#nextId, snapshots: this.all() }
    const tmp = `${this.#file}.tmp`
    const handle = await open(tmp, 'w', 0o600)
    try {
      await handle.writeFile(JSON.stringify(body))
      await handle.sync()
    } finally {
      await handle.close()
    }
    await rename(tmp, this.#file)
    const dir = await open(join(this.#file, '..'), 'r')
    try {
      await dir.sync()
    } finally {
      await dir.close()
    }
  }
}
