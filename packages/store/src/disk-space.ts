import { statfs } from 'node:fs/promises'
import { StoreFullError } from './errors.js'

/** Free space is asked of the file system again after this long (others write to it too), or when it runs low. */
const STATFS_MS = 1000

/** Bytes free on the file system holding `dir` for this user, and its size. */
export async function diskSpace(dir: string): Promise<{ free: number; size: number; block: number }> {
  const s = await statfs(dir)
  return { free: s.bavail * s.bsize, size: s.blocks * s.bsize, block: s.bsize }
}

/** The disk store's estimate of the room left on its file system, and the headroom it keeps free there. */
export class FreeSpace {
  private readonly dir: string
  /** Bytes of the file system left free for the index (0: none). */
  private readonly headroom: number
  /**
   * Free space as the file system last said, less what puts reserved since (an estimate that errs low), and when
   * it was asked; chunk files being written count in `writing` until they are.
   */
  private space: { free: number; at: number; block: number }
  private writing = 0
  private spaceCheck: Promise<void> | undefined

  constructor(dir: string, headroom: number, space: { free: number; block: number }) {
    this.dir = dir
    this.headroom = headroom
    this.space = { ...space, at: performance.now() }
  }

  /**
   * Room on the file system for a chunk file of `size` bytes, leaving the headroom free; the bytes taken, which the
   * caller gives back from `writing` once the file is written. The file system is asked again when its last answer
   * is old or the estimate runs low (one question at a time). Throws StoreFullError when there is no room.
   */
  async take(digest: string, size: number): Promise<number> {
    if (this.headroom <= 0) return 0
    const need = Math.ceil(Math.max(size, 1) / this.space.block) * this.space.block
    if (this.space.free - need < 2 * this.headroom || performance.now() - this.space.at > STATFS_MS) {
      this.spaceCheck ??= diskSpace(this.dir)
        .then(({ free, block }) => {
          // Files being written may not show in the answer yet: they count against it.
          this.space = { free: free - this.writing, at: performance.now(), block }
        })
        .catch(() => {
          // Unknown: the write below says whether there is room.
          this.space = { free: Number.POSITIVE_INFINITY, at: performance.now(), block: this.space.block }
        })
        .finally(() => {
          this.spaceCheck = undefined
        })
      await this.spaceCheck
    }
    if (this.space.free - need < this.headroom) {
      throw new StoreFullError(this.dir, digest, { free: Math.max(0, Math.round(this.space.free)) })
    }
    this.space.free -= need
    this.writing += need
    return need
  }

  /** Gives back the bytes `take` counted as being written, once the file is written (or not). */
  give(bytes: number): void {
    this.writing -= bytes
  }
}
