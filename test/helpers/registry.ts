import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** A real CNCF distribution registry (Debian's `docker-registry`) on a loopback port, for one test file. */
export interface TestRegistry {
  /** `127.0.0.1:PORT`: use as the registry part of references, e.g. `${host}/app:1`. */
  host: string
  url: string
  dir: string
  stop(): Promise<void>
}

export interface RegistryOptions {
  /** htpasswd lines (bcrypt, e.g. from `htpasswd -Bbn user pass`): turns on Basic auth. */
  htpasswd?: string
  /** Token auth: the registry trusts tokens signed by this certificate's key. */
  token?: { realm: string; service: string; issuer: string; rootCertBundle: string }
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.once('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address()
      srv.close(() => resolve(typeof addr === 'object' && addr !== null ? addr.port : 0))
    })
  })
}

export async function startRegistry(options: RegistryOptions = {}): Promise<TestRegistry> {
  const dir = await mkdtemp(join(tmpdir(), 'strata-registry-'))
  const port = await freePort()
  const host = `127.0.0.1:${port}`
  let auth = ''
  if (options.htpasswd !== undefined) {
    await writeFile(join(dir, 'htpasswd'), options.htpasswd)
    auth = `auth:\n  htpasswd:\n    realm: strata-test\n    path: ${join(dir, 'htpasswd')}\n`
  } else if (options.token !== undefined) {
    const t = options.token
    auth = `auth:\n  token:\n    realm: ${t.realm}\n    service: ${t.service}\n    issuer: ${t.issuer}\n    rootcertbundle: ${t.rootCertBundle}\n`
  }
  const config = `version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: ${join(dir, 'data')}
  delete:
    enabled: true
http:
  addr: ${host}
${auth}`
  await writeFile(join(dir, 'config.yml'), config)
  const proc: ChildProcess = spawn('docker-registry', ['serve', join(dir, 'config.yml')], {
    stdio: ['ignore', 'ignore', 'pipe']
  })
  let stderr = ''
  proc.stderr?.on('data', (d: Buffer) => {
    stderr += d.toString()
  })
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()))
  const deadline = Date.now() + 15_000
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`docker-registry exited (${proc.exitCode}): ${stderr}`)
    try {
      const res = await fetch(`http://${host}/v2/`)
      await res.arrayBuffer()
      break
    } catch {
      if (Date.now() > deadline) throw new Error(`docker-registry did not answer on ${host}: ${stderr}`)
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  return {
    host,
    url: `http://${host}`,
    dir,
    async stop() {
      proc.kill('SIGTERM')
      await exited
      await rm(dir, { recursive: true, force: true })
    }
  }
}
