import { execFile } from 'node:child_process'
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import { createConnection, createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { peerCredentials } from '../src/index.js'

describe('peerCredentials', () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'strata-native-'))
  })
  afterAll(() => rm(dir, { recursive: true, force: true }))

  const accept = async (path: string, connect: () => void): Promise<ReturnType<typeof peerCredentials>> => {
    const server = createServer()
    await new Promise<void>((resolve) => server.listen(path, resolve))
    await chmod(path, 0o777)
    try {
      const got = new Promise<Socket>((resolve) => server.once('connection', resolve))
      connect()
      const socket = await got
      const creds = peerCredentials(socket)
      socket.destroy()
      return creds
    } finally {
      await new Promise((resolve) => server.close(resolve))
    }
  }

  it('names the connecting process of this process', async () => {
    const path = join(dir, 'self.sock')
    let client: Socket | undefined
    const creds = await accept(path, () => {
      client = createConnection(path)
    })
    client?.destroy()
    expect(creds).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() })
  })

  it.runIf(process.getuid?.() === 0)('names another user when that user connects', async () => {
    const path = join(dir, 'other.sock')
    await chmod(dir, 0o755)
    let child: ReturnType<typeof execFile> | undefined
    const creds = await accept(path, () => {
      child = execFile('setpriv', [
        '--reuid=65534',
        '--regid=65534',
        '--clear-groups',
        process.execPath,
        '-e',
        `const c = require('node:net').createConnection(${JSON.stringify(path)}); setTimeout(() => c.destroy(), 2000)`
      ])
    })
    child?.kill()
    expect(creds.uid).toBe(65534)
    expect(creds.gid).toBe(65534)
  })

  it('refuses a socket without a descriptor', () => {
    expect(() => peerCredentials({} as Socket)).toThrow(/no file descriptor/)
  })
})
