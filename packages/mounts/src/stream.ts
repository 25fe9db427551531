import { alive, type ClientProcess } from './clients.js'

/** The open request (p2p-mount's stream) that holds a mount, as the service tells it what happened. */
export interface Stream {
  /** The mount was unmounted at its owner's ask: end with the result. */
  release(): void
  /** Something to pass on, or the process is stopping: look again. */
  wake(): void
  /** The same client holds the mount through a new request: end without unmounting. */
  handOver(): void
}

/**
 * Checks now and every second, until the caller clears the timer, that `client` is alive (not while `skip()`);
 * calls `gone` when it is not. A mount served again after a restart ends when its client died before it came
 * back for it.
 */
export function watchClient(client: ClientProcess, skip: () => boolean, gone: () => Promise<void>): NodeJS.Timeout {
  const check = async () => {
    if (skip()) return
    if (await alive(client)) return
    await gone()
  }
  const timer = setInterval(() => void check(), 1000)
  timer.unref()
  void check()
  return timer
}
