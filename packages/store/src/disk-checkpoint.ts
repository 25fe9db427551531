import { syncChunks } from './disk-files.js'
import { type IndexWriter, syncedOp } from './disk-index.js'

/*
 * Durability by checkpoints (group commit), not per put: a put writes and renames its file without fsync and
 * records the current generation with it. A checkpoint (every checkpointMs, every CHECKPOINT_BYTES, and on close)
 * starts a new generation, syncs the files of the old one and their directories, then writes s!synced with a
 * synchronous LevelDB write. After a power loss, chunk files of generations above s!synced may be missing,
 * short or garbage: the repair pass on open reads and hashes exactly those before anything is served.
 */

/** Bytes put since the last checkpoint that start the next one at once. */
const CHECKPOINT_BYTES = 64 * 1024 * 1024
/** Bytes put since the last checkpoint past which puts wait for one (bounds the repair work after a power loss). */
const MAX_UNSYNCED_BYTES = 4 * CHECKPOINT_BYTES

/** The disk store's checkpoints: the generation puts record, the files put in it, and the syncs that make them durable. */
export class Checkpointer {
  /** The generation puts record now; every generation up to the one before it is durable or being made so. */
  gen: number
  private readonly dir: string
  private readonly fsync: boolean
  private readonly writer: IndexWriter
  /** A checkpoint that failed, counted and announced by the store. */
  private readonly failed: (operation: string, err: unknown) => void
  private readonly checkpointTimer: NodeJS.Timeout
  /** Chunk files put in this generation: the next checkpoint syncs them. */
  private unsynced = new Set<string>()
  private unsyncedBytes = 0
  /** The checkpoint running or queued (undefined when none). */
  private checkpoints: Promise<void> | undefined
  /** A checkpoint failed: what it covered may not be on disk, so no later one may claim durability. */
  private syncFailed = false

  constructor(init: {
    dir: string
    fsync: boolean
    writer: IndexWriter
    gen: number
    checkpointMs: number
    failed: (operation: string, err: unknown) => void
  }) {
    this.dir = init.dir
    this.fsync = init.fsync
    this.writer = init.writer
    this.gen = init.gen
    this.failed = init.failed
    this.checkpointTimer = setInterval(() => {
      if (this.checkpoints === undefined && this.unsynced.size > 0) void this.checkpoint()
    }, init.checkpointMs)
    this.checkpointTimer.unref()
  }

  /** Whether puts must wait for a checkpoint before writing more. */
  get behind(): boolean {
    return this.unsyncedBytes >= MAX_UNSYNCED_BYTES
  }

  /** A chunk file put in this generation; enough of them start the next checkpoint at once. */
  add(path: string, size: number): void {
    this.unsynced.add(path)
    this.unsyncedBytes += size
    if (this.unsyncedBytes >= CHECKPOINT_BYTES && this.checkpoints === undefined) void this.checkpoint()
  }

  /** No more checkpoints by the clock (close runs the last one). */
  stop(): void {
    clearInterval(this.checkpointTimer)
  }

  /**
   * Makes every chunk put before this call durable: after the checkpoint in progress (if any), starts a new
   * generation, syncs the files put in the old one and their directories, then records the old one as synced
   * with a synchronous index write (which also makes their index records durable). Never rejects: after a
   * failed sync nothing is claimed durable again in this process, so the next open verifies it all.
   */
  checkpoint(): Promise<void> {
    const next = (this.checkpoints ?? Promise.resolve()).then(async () => {
      if (this.unsynced.size === 0) return
      const files = [...this.unsynced]
      const gen = this.gen++
      this.unsynced = new Set()
      this.unsyncedBytes = 0
      try {
        if (this.fsync) await syncChunks(this.dir, files)
        if (!this.syncFailed) await this.writer.write([syncedOp(gen)], true)
      } catch (err) {
        this.syncFailed = true
        this.failed('checkpoint', err)
      }
    })
    this.checkpoints = next
    void next.then(() => {
      if (this.checkpoints === next) this.checkpoints = undefined
    })
    return next
  }
}
