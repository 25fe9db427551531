import { spawn } from 'node:child_process'
import { closeSync, fstatSync, openSync, readSync, writeFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { backingClose, backingOpen, pidfdGetfd } from '../src/index.js'

describe('pidfdGetfd', () => {
  let dir: string
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'strata-native-fds-'))
  })
  afterAll(() => rm(dir, { recursive: true, force: true }))

  it("gives this process another process's open file description (the same offset)", async () => {
    const path = join(dir, 'f')
    writeFileSync(path, 'abcdefgh')
    // The child opens the file, reads 3 bytes (offset 3), says its fd, and waits.
    const child = spawn(
      process.execPath,
      [
        '-e',
        `const fs = require('node:fs'); const fd = fs.openSync(${JSON.stringify(path)}, 'r'); fs.readSync(fd, Buffer.alloc(3)); console.log(fd); setTimeout(() => {}, 10000)`
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] }
    )
    try {
      const childFd = Number(
        await new Promise<string>((resolve) => child.stdout.once('data', (d) => resolve(String(d))))
      )
      const fd = pidfdGetfd(child.pid!, childFd)
      try {
        expect(fstatSync(fd).ino).toBe(fstatSync(openSync(path, 'r')).ino)
        const b = Buffer.alloc(8)
        const n = readSync(fd, b, 0, 8, null)
        expect(b.subarray(0, n).toString()).toBe('defgh')
      } finally {
        closeSync(fd)
      }
    } finally {
      child.kill()
    }
  })

  it('says ESRCH for no such process and EBADF for no such descriptor', () => {
    expect(() => pidfdGetfd(2 ** 22 + 12345, 0)).toThrow(
      expect.objectContaining({ code: expect.stringMatching(/ESRCH|EINVAL/) })
    )
    expect(() => pidfdGetfd(process.pid, 9999)).toThrow(expect.objectContaining({ code: 'EBADF' }))
  })
})

describe('backingOpen', () => {
  it('is refused on a descriptor that is not a FUSE device', () => {
    const fd = openSync('/dev/null', 'r')
    try {
      expect(() => backingOpen(fd, fd)).toThrow(expect.objectContaining({ code: 'ENOTTY' }))
      expect(() => backingClose(fd, 1)).toThrow(expect.objectContaining({ code: 'ENOTTY' }))
    } finally {
      closeSync(fd)
    }
  })
})
