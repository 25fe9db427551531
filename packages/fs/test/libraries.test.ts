import { readFileSync, realpathSync } from 'node:fs'
import type { Entry } from '@strata/stargz'
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { readElfDependencies } from '../src/elf.js'
import { buildTree, createOperations, type ReadRange } from '../src/index.js'
import { resolveFile } from '../src/libraries.js'
import { makeToc, readBytes } from './toc.js'

/** This machine's /bin/ls and the libraries it loads (Debian 12: libselinux, which needs libpcre2-8; libc). */
const host = (path: string) => readFileSync(realpathSync(path))
const ls = host('/bin/ls')
const reader = (bytes: Uint8Array) => async (offset: number, length: number) => bytes.subarray(offset, offset + length)

describe('readElfDependencies', () => {
  it("reads a real program's interpreter and needed libraries", async () => {
    const deps = await readElfDependencies(reader(ls), ls.length)
    expect(deps?.interpreter).toMatch(/^\/lib.*\/ld-linux[-\w]*\.so\.\d$/)
    expect(deps?.needed).toContain('libc.so.6')
    expect(deps?.needed).toContain('libselinux.so.1')
    expect(deps?.machine).toBe(process.arch === 'x64' ? 62 : deps?.machine)
  })

  it('reads a shared library (no interpreter) and says nothing of files that are not ELF', async () => {
    const lib = host('/lib/x86_64-linux-gnu/libselinux.so.1')
    const deps = await readElfDependencies(reader(lib), lib.length)
    expect(deps?.interpreter).toBeUndefined()
    expect(deps?.needed).toEqual(expect.arrayContaining(['libpcre2-8.so.0', 'libc.so.6']))
    const script = new TextEncoder().encode(`#!/bin/sh\necho hello${' '.repeat(100)}\n`)
    expect(await readElfDependencies(reader(script), script.length)).toBeUndefined()
    expect(await readElfDependencies(reader(ls.subarray(0, 63)), 63)).toBeUndefined()
  })

  it('never throws on damaged headers, and never reads outside the file', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat(8191), fc.integer({ min: 0, max: 255 })), { maxLength: 24 }),
        fc.integer({ min: 64, max: ls.length }),
        async (flips, size) => {
          const bytes = Uint8Array.from(ls.subarray(0, size))
          for (const [at, value] of flips) if (at < size) bytes[at] = value
          const deps = await readElfDependencies(async (offset, length) => {
            expect(offset).toBeGreaterThanOrEqual(0)
            expect(offset + length).toBeLessThanOrEqual(size)
            return bytes.subarray(offset, offset + length)
          }, size)
          if (deps !== undefined) expect(deps.needed.every((n) => typeof n === 'string' && n !== '')).toBe(true)
        }
      ),
      { numRuns: 2000 }
    )
  })
})

describe('library prefetch', () => {
  const files: Record<string, Uint8Array> = {
    'usr/bin/ls': ls,
    'usr/lib/x86_64-linux-gnu/libc.so.6': host('/lib/x86_64-linux-gnu/libc.so.6'),
    'usr/lib/x86_64-linux-gnu/libselinux.so.1': host('/lib/x86_64-linux-gnu/libselinux.so.1'),
    'usr/lib/x86_64-linux-gnu/libpcre2-8.so.0': host('/lib/x86_64-linux-gnu/libpcre2-8.so.0'),
    'usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2': host('/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2')
  }
  // Debian's merged /usr: the loader finds everything through symlinks.
  const layers = [
    makeToc([
      ...Object.entries(files).map(([path, bytes]) => ({ path, size: bytes.length, mode: 0o755 })),
      { path: 'usr/lib/x86_64-linux-gnu/libunused.so.1', size: 100, mode: 0o644 },
      { path: 'bin', type: 'symlink', linkName: 'usr/bin' },
      { path: 'lib', type: 'symlink', linkName: 'usr/lib' },
      { path: 'lib64/ld-linux-x86-64.so.2', type: 'symlink', linkName: '/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2' }
    ] as Array<Partial<Entry> & { path: string }>)
  ]
  const tree = buildTree(layers)

  const mount = (prefetchLibraries: boolean) => {
    const read = new Set<string>()
    const readFile: ReadRange = async (_layer, entry, offset, into) => {
      read.add(entry.path)
      into.set((files[entry.path] ?? new Uint8Array(entry.size)).subarray(offset, offset + into.length))
      return into.length
    }
    return { ops: createOperations(tree, readFile, { prefetchLibraries }), read }
  }
  const settle = () => new Promise((resolve) => setTimeout(resolve, 50))

  it('follows symlinks in every component, as open(2) does', () => {
    expect(resolveFile(tree, '/lib64/ld-linux-x86-64.so.2')?.source?.entry.path).toBe(
      'usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2'
    )
    expect(resolveFile(tree, '/bin/../lib/./x86_64-linux-gnu/libc.so.6')?.source?.entry.path).toBe(
      'usr/lib/x86_64-linux-gnu/libc.so.6'
    )
    expect(resolveFile(tree, '/lib/x86_64-linux-gnu')).toBeUndefined()
    expect(resolveFile(tree, '/lib/nothing.so')).toBeUndefined()
  })

  it('reads the interpreter and the needed libraries, and theirs, when a program is first read', async () => {
    const { ops, read } = mount(true)
    await readBytes(ops, '/usr/bin/ls', 0, 4096)
    await settle()
    expect([...read].sort()).toEqual(Object.keys(files).sort())
  })

  it('reads nothing more when turned off', async () => {
    const { ops, read } = mount(false)
    await readBytes(ops, '/usr/bin/ls', 0, 4096)
    await settle()
    expect([...read]).toEqual(['usr/bin/ls'])
  })
})
