import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createRegistryClient } from '@strata/registry'
import { createMemoryStore } from '@strata/store'
import { buildTestImage, type TestImage } from '@test/images.js'
import { startRegistry, type TestRegistry } from '@test/registry.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createNode, type StrataNode } from '../src/index.js'

// Over months a CI pushes a tag per commit: p2pd keeps the images of the references opened most recently only.

let work: string
let registry: TestRegistry
let node: StrataNode
const images: TestImage[] = []

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-open-'))
  registry = await startRegistry()
  for (const name of ['a', 'b', 'c']) {
    const dir = join(work, name)
    await mkdir(join(dir, 'etc'), { recursive: true })
    await writeFile(join(dir, 'etc', 'name'), `${name}\n`)
    images.push(await buildTestImage({ registry: registry.host, tag: name, estargz: true, layers: [{ files: dir }] }))
  }
  node = await createNode({
    store: createMemoryStore(),
    dataDir: work,
    listen: ['/ip4/127.0.0.1/tcp/0'],
    registry: createRegistryClient({}),
    maxReferences: 2
  })
}, 120_000)

afterAll(async () => {
  await node?.stop()
  await registry?.stop()
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

describe('images a node keeps open', () => {
  it('are those of its most recently opened references; one let go opens again', async () => {
    const [a, b, c] = images.map((i) => i.ref) as [string, string, string]
    const first = { a: await node.openImage(a), b: await node.openImage(b) }
    expect(await node.openImage(a)).toBe(first.a)
    // c makes three references: b, the least recently opened, is let go; a stays.
    const openedC = await node.openImage(c)
    expect(openedC.digest).toBe(images[2]!.digest)
    expect(await node.openImage(a)).toBe(first.a)
    const again = await node.openImage(b)
    expect(again).not.toBe(first.b)
    expect(again.digest).toBe(first.b.digest)
  })

  it('are no more files than maxOpenedFiles all together: past it, the least recently opened are let go', async () => {
    const [a, b, c] = images.map((i) => i.ref) as [string, string, string]
    const files = (await node.openImage(a)).layers.reduce((n, l) => n + l.toc.entries.size, 0)
    // The three images have as many files each: two fit.
    const small = await createNode({
      store: createMemoryStore(),
      dataDir: join(work, 'small'),
      listen: ['/ip4/127.0.0.1/tcp/0'],
      registry: createRegistryClient({}),
      maxOpenedFiles: 2 * files
    })
    try {
      const first = { a: await small.openImage(a), b: await small.openImage(b) }
      expect(await small.openImage(a)).toBe(first.a)
      // c makes three images' files: b, the least recently opened, is let go; a stays.
      await small.openImage(c)
      expect(await small.openImage(a)).toBe(first.a)
      expect(await small.openImage(b)).not.toBe(first.b)
    } finally {
      await small.stop()
    }
  })
})
