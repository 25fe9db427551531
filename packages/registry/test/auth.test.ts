import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { startTokenServer, type TokenServer } from '@test/token-server.js'
import { run } from '@test/tools.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createRegistryClient } from '../src/index.js'
import { pushImage } from './image.js'

let dir: string
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'strata-auth-test-'))
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

async function rejection(p: Promise<unknown>): Promise<Error & { hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { hint?: string }
  }
  throw new Error('expected a rejection')
}

describe('htpasswd Basic auth', () => {
  let reg: TestRegistry
  beforeAll(async () => {
    const { stdout } = await run('htpasswd', ['-Bbn', 'alice', 's3cret'])
    reg = await startRegistry({ htpasswd: stdout })
  })
  afterAll(() => reg?.stop())

  it('pushes and pulls with explicit credentials', async () => {
    const client = createRegistryClient({
      dockerConfig: false,
      credentials: { [reg.host]: { username: 'alice', password: 's3cret' } }
    })
    const pushed = await pushImage(client, `${reg.host}/basic/app:1`, [1000])
    expect((await client.getImage(`${reg.host}/basic/app:1`)).digest).toBe(pushed.digest)
  })

  it('fails without credentials, and with wrong ones, saying what to do', async () => {
    const anon = createRegistryClient({ dockerConfig: false })
    const e1 = await rejection(anon.getImage(`${reg.host}/basic/app:1`))
    expect(e1.name).toBe('UnauthorizedError')
    expect(e1.message).toContain(`${reg.host}/basic/app`)
    expect(e1.hint).toContain('--creds')
    const wrong = createRegistryClient({
      dockerConfig: false,
      credentials: { [reg.host]: { username: 'alice', password: 'nope' } }
    })
    const e2 = await rejection(wrong.getImage(`${reg.host}/basic/app:1`))
    expect(e2.name).toBe('UnauthorizedError')
    expect(e2.message).toMatch(/rejected the credentials/)
  })

  it('reads credentials from a docker config file (auths, base64 auth)', async () => {
    const cfg = join(dir, 'basic-config.json')
    await writeFile(
      cfg,
      JSON.stringify({ auths: { [reg.host]: { auth: Buffer.from('alice:s3cret').toString('base64') } } })
    )
    const client = createRegistryClient({ dockerConfig: cfg })
    expect((await client.getImage(`${reg.host}/basic/app:1`)).layers.length).toBe(1)
  })

  it('finds the docker config through $DOCKER_CONFIG', async () => {
    const cfgDir = join(dir, 'docker-env')
    await import('node:fs/promises').then((fs) => fs.mkdir(cfgDir))
    await writeFile(
      join(cfgDir, 'config.json'),
      JSON.stringify({ auths: { [`http://${reg.host}`]: { auth: Buffer.from('alice:s3cret').toString('base64') } } })
    )
    const saved = process.env.DOCKER_CONFIG
    process.env.DOCKER_CONFIG = cfgDir
    try {
      expect((await createRegistryClient().getImage(`${reg.host}/basic/app:1`)).layers.length).toBe(1)
    } finally {
      if (saved === undefined) delete process.env.DOCKER_CONFIG
      else process.env.DOCKER_CONFIG = saved
    }
  })

  it('runs a credential helper (credHelpers and credsStore) with the server on stdin', async () => {
    const bin = join(dir, 'bin')
    await import('node:fs/promises').then((fs) => fs.mkdir(bin))
    const log = join(dir, 'helper.log')
    const script = `#!/bin/sh
read server
echo "$1 $server" >> ${log}
if [ "$server" = "${reg.host}" ]; then
  printf '{"ServerURL":"%s","Username":"alice","Secret":"s3cret"}' "$server"
else
  echo "credentials not found in native keychain" >&2; exit 1
fi
`
    await writeFile(join(bin, 'docker-credential-test'), script)
    await chmod(join(bin, 'docker-credential-test'), 0o755)
    const savedPath = process.env.PATH
    process.env.PATH = `${bin}:${savedPath}`
    try {
      for (const config of [{ credHelpers: { [reg.host]: 'test' } }, { credsStore: 'test' }]) {
        const cfg = join(dir, 'helper-config.json')
        await writeFile(cfg, JSON.stringify(config))
        const client = createRegistryClient({ dockerConfig: cfg })
        expect((await client.getImage(`${reg.host}/basic/app:1`)).layers.length).toBe(1)
      }
      const calls = (await import('node:fs/promises').then((fs) => fs.readFile(log, 'utf8'))).trim().split('\n')
      expect(calls).toEqual([`get ${reg.host}`, `get ${reg.host}`])

      const missing = join(dir, 'missing-helper.json')
      await writeFile(missing, JSON.stringify({ credHelpers: { [reg.host]: 'absent' } }))
      const err = await rejection(createRegistryClient({ dockerConfig: missing }).getImage(`${reg.host}/basic/app:1`))
      expect(err.name).toBe('CredentialHelperFailedError')
      expect(err.message).toContain('docker-credential-absent is not on PATH')
    } finally {
      process.env.PATH = savedPath
    }
  })
})

describe.each(['RS256', 'ES256'] as const)('Bearer token auth (%s)', (alg) => {
  let tokens: TokenServer
  let reg: TestRegistry
  beforeAll(async () => {
    tokens = await startTokenServer({ alg, users: { bob: 'pw' }, anonymous: ['pull'] })
    reg = await startRegistry({ token: tokens })
  })
  afterAll(async () => {
    await reg?.stop()
    await tokens?.stop()
  })

  it('pushes with a user token and pulls anonymously, caching tokens per scope', async () => {
    const bob = createRegistryClient({
      dockerConfig: false,
      credentials: { [reg.host]: { username: 'bob', password: 'pw' } }
    })
    const pushed = await pushImage(bob, `${reg.host}/tok/app:1`, [2000, 10])
    const pushTokens = tokens.requests.filter((r) => r.user === 'bob')
    expect(pushTokens.length).toBeGreaterThan(0)
    expect(pushTokens.length).toBeLessThanOrEqual(3)
    expect(pushTokens.some((r) => r.scopes.includes('repository:tok/app:pull,push'))).toBe(true)

    const anon = createRegistryClient({ dockerConfig: false })
    const before = tokens.requests.length
    const img = await anon.getImage(`${reg.host}/tok/app:1`)
    expect(img.digest).toBe(pushed.digest)
    await anon.fetchBlob(`${reg.host}/tok/app`, img.config.digest)
    await anon.blob(`${reg.host}/tok/app`, img.layers[0]!).readAt(0, 100)
    expect(tokens.requests.length - before).toBe(1)
  })

  it('shares one token request between concurrent requests', async () => {
    const anon = createRegistryClient({ dockerConfig: false })
    const img = await createRegistryClient({ dockerConfig: false }).getImage(`${reg.host}/tok/app:1`)
    const before = tokens.requests.length
    const blob = anon.blob(`${reg.host}/tok/app`, img.layers[0]!)
    const parts = await Promise.all(Array.from({ length: 8 }, (_, i) => blob.readAt(i * 100, 100)))
    expect(parts.every((p) => p.length === 100)).toBe(true)
    expect(tokens.requests.length - before).toBe(1)
  })

  it('refreshes a token the registry no longer accepts (401) and goes on', async () => {
    const anon = createRegistryClient({ dockerConfig: false })
    tokens.issueExpired = 1
    const before = tokens.requests.length
    const img = await anon.getImage(`${reg.host}/tok/app:1`)
    expect(img.layers.length).toBe(2)
    expect(tokens.requests.length - before).toBe(2)
    expect(tokens.issueExpired).toBe(0)
  })

  it('anonymous push is refused with a clear error, wrong passwords at the token server too', async () => {
    const anon = createRegistryClient({ dockerConfig: false })
    const e1 = await rejection(pushImage(anon, `${reg.host}/tok/other:1`, [10]))
    expect(e1.name).toBe('UnauthorizedError')
    expect(e1.message).toContain(`${reg.host}/tok/other`)
    const wrong = createRegistryClient({
      dockerConfig: false,
      credentials: { [reg.host]: { username: 'bob', password: 'x' } }
    })
    const e2 = await rejection(wrong.getImage(`${reg.host}/tok/app:1`))
    expect(e2.name).toBe('UnauthorizedError')
    expect(e2.message).toMatch(/token server .* refused the credentials/)
  })
})
