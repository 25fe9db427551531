import { UsageError } from './command.js'

export interface Credentials {
  username: string
  password: string
}

/** host, host:port, or [v6]:port, as registries are named in references. */
const HOST = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(:\d{1,5})?$/

/**
 * `--creds` values, each `HOST=USER:PASS` (for that registry only) or, where `unscoped` names the registries
 * a command reads (p2pctl, p2p-mount), `USER:PASS` for those. Credentials are never sent to any other host: a
 * daemon, which opens what peers and callers name, takes the scoped form only.
 */
export function parseCredentials(values: readonly string[], unscoped?: readonly string[]): Record<string, Credentials> {
  const byHost: Record<string, Credentials> = {}
  for (const value of values) {
    const eq = value.indexOf('=')
    const host = eq > 0 ? value.slice(0, eq) : undefined
    const scoped = host !== undefined && HOST.test(host)
    const pair = scoped ? value.slice(eq + 1) : value
    const colon = pair.indexOf(':')
    if (colon <= 0) throw new UsageError(`--creds must be HOST=USER:PASS${unscoped ? ' or USER:PASS' : ''}`)
    const creds = { username: pair.slice(0, colon), password: pair.slice(colon + 1) }
    if (scoped) {
      byHost[host] = creds
    } else if (unscoped !== undefined) {
      for (const h of unscoped) byHost[h] ??= creds
    } else {
      throw new UsageError(
        '--creds needs the registry it is for: --creds HOST=USER:PASS (repeat it for each registry); credentials are sent to that host only'
      )
    }
  }
  return byHost
}
