// Who holds a p2p-mount's mount: the process that asked (SO_PEERCRED's pid), told apart from a later process
// given the same pid by its start time. When it is gone, the mount it held ends.
import { readFile } from 'node:fs/promises'

/** A p2p-mount process: its pid and its start time (a pid is reused; the pair is not). */
export interface ClientProcess {
  pid: number
  start: string
}

/** The process asking (SO_PEERCRED's pid), with its start time from /proc. */
export async function clientOf(caller: { pid?: number | undefined }): Promise<{ client?: ClientProcess }> {
  if (caller.pid === undefined || caller.pid <= 0) return {}
  const start = await startTime(caller.pid)
  return start === undefined ? {} : { client: { pid: caller.pid, start } }
}

export async function alive(client: ClientProcess): Promise<boolean> {
  return (await startTime(client.pid)) === client.start
}

export function sameClient(a: ClientProcess | undefined, b: ClientProcess | undefined): boolean {
  return a !== undefined && b !== undefined && a.pid === b.pid && a.start === b.start
}

/** Field 22 of /proc/PID/stat (after the command, which may hold spaces and parentheses). */
async function startTime(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
  if (stat === undefined) return undefined
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]
}
