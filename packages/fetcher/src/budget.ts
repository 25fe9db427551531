/**
 * Bytes that may be in flight at once, taken before and given back after; first come, first served. A taker larger
 * than the whole budget gets it when nothing else is in flight.
 */
export class ByteBudget {
  private used = 0
  private readonly waiting: Array<{ bytes: number; go: () => void }> = []
  readonly max: number

  constructor(max: number) {
    this.max = max
  }

  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    signal?.throwIfAborted()
    if (this.waiting.length === 0 && this.fits(bytes)) {
      this.used += bytes
      return
    }
    await new Promise<void>((resolve, reject) => {
      const waiter = {
        bytes,
        go: () => {
          signal?.removeEventListener('abort', onAbort)
          resolve()
        }
      }
      const onAbort = () => {
        const i = this.waiting.indexOf(waiter)
        if (i >= 0) this.waiting.splice(i, 1)
        reject(signal?.reason)
        this.wake()
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      this.waiting.push(waiter)
    })
  }

  give(bytes: number): void {
    this.used -= bytes
    this.wake()
  }

  private fits(bytes: number): boolean {
    return this.used === 0 || this.used + bytes <= this.max
  }

  private wake(): void {
    while (this.waiting.length > 0 && this.fits(this.waiting[0]!.bytes)) {
      const next = this.waiting.shift()!
      this.used += next.bytes
      next.go()
    }
  }
}
