// Requests from /dev/fuse: the `dd` relay that brings them into a pipe, and the stream that cuts them into messages.
import { type ChildProcess, spawn } from 'node:child_process'
import { IN_HEADER } from './protocol.js'

/** The relay's read buffer: larger than any request the kernel sends a read-only mount (the kernel checks). */
export const RELAY_BUFFER = 1 << 20

/**
 * Splits a byte stream into FUSE messages, each of which starts with its length (u32): requests from the relay's
 * pipe, replies and requests on a holder's socket. A message split over reads is put together in a buffer of
 * its size; one whole in a read is passed on as a view of it.
 */
export class MessageStream {
  readonly #min: number
  readonly #max: number
  readonly #onMessage: (message: Buffer) => void
  readonly #head = Buffer.alloc(4)
  #headBytes = 0
  #partial: Buffer | undefined
  #have = 0
  #broken = false
  readonly #scratch: Buffer | undefined

  /**
   * `onBroken` hears of a length outside [min, max]: the stream is not FUSE messages; nothing more is read.
   * `reuse`: messages are put together in one buffer, used again for the next: a message is valid only until
   * `onMessage` returns (the holder, which writes each reply at once, allocates nothing per reply).
   */
  constructor(
    min: number,
    max: number,
    onMessage: (message: Buffer) => void,
    readonly onBroken: () => void,
    reuse = false
  ) {
    this.#min = min
    this.#max = max
    this.#onMessage = onMessage
    if (reuse) this.#scratch = Buffer.allocUnsafeSlow(max)
  }

  #buffer(len: number): Buffer {
    return this.#scratch?.subarray(0, len) ?? Buffer.allocUnsafe(len)
  }

  /** Whether part of a message is waiting for the rest. */
  get midway(): boolean {
    return this.#partial !== undefined || this.#headBytes > 0
  }

  push(data: Buffer): void {
    let at = 0
    while (at < data.length && !this.#broken) {
      if (this.#partial !== undefined) {
        const n = Math.min(this.#partial.length - this.#have, data.length - at)
        data.copy(this.#partial, this.#have, at, at + n)
        this.#have += n
        at += n
        if (this.#have === this.#partial.length) {
          const message = this.#partial
          this.#partial = undefined
          this.#onMessage(message)
        }
        continue
      }
      let len: number
      if (this.#headBytes > 0 || data.length - at < 4) {
        const n = Math.min(4 - this.#headBytes, data.length - at)
        data.copy(this.#head, this.#headBytes, at, at + n)
        this.#headBytes += n
        at += n
        if (this.#headBytes < 4) return
        this.#headBytes = 0
        len = this.#head.readUInt32LE(0)
        if (!this.#check(len)) return
        this.#partial = this.#buffer(len)
        this.#head.copy(this.#partial)
        this.#have = 4
        continue
      }
      len = data.readUInt32LE(at)
      if (!this.#check(len)) return
      if (data.length - at >= len) {
        this.#onMessage(data.subarray(at, at + len))
        at += len
        continue
      }
      this.#partial = this.#buffer(len)
      this.#have = data.copy(this.#partial, 0, at)
      at = data.length
    }
  }

  #check(len: number): boolean {
    if (len >= this.#min && len <= this.#max) return true
    this.#broken = true
    this.onBroken()
    return false
  }
}

/**
 * The `dd` child that reads requests from /dev/fuse into a pipe (a read of /dev/fuse blocks; Node waits on a
 * pipe without tying up one of its I/O threads), and the requests it brings, one message each. `setpriv
 * --pdeathsig` makes it die with this process: a dead server leaves a mount that says "not connected".
 */
export class Relay {
  readonly #child: ChildProcess
  /** When the relay has exited (the connection ended, or it was killed): with what it said on stderr. */
  readonly ended: Promise<string>

  constructor(fd: number, onRequest: (request: Buffer) => void) {
    this.#child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', 'dd', `bs=${RELAY_BUFFER}`, 'status=none'], {
      stdio: [fd, 'pipe', 'pipe']
    })
    let stderr = ''
    this.#child.stderr!.on('data', (d) => {
      stderr += d
    })
    // Not a FUSE request: the stream is broken. Stop rather than guess.
    const requests = new MessageStream(IN_HEADER, RELAY_BUFFER, onRequest, () => this.kill())
    this.#child.stdout!.on('data', (d: Buffer) => requests.push(d))
    // A broken pipe ends the relay, and with it the connection; it must not end the process.
    this.#child.stdout!.on('error', () => this.kill())
    this.#child.stderr!.on('error', () => {})
    this.ended = new Promise((resolve) => {
      this.#child.on('error', (err) => resolve(err.message))
      this.#child.on('close', () => resolve(stderr.trim()))
    })
  }

  kill(): void {
    this.#child.kill('SIGKILL')
  }
}
