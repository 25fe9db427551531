import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createFetcher, type ImageLayer } from '@strata/fetcher'
import { canServeDirectly, createFuseHolder, heldMounts, isMounted, resumeMount, serveMount } from '@strata/fs'
import { type FileReadAt, fileReader, type Layer, openLayer, readChunk } from '@strata/stargz'
import { openDiskStore } from '@strata/store'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Fixture, makeFixture } from './fixture.js'

// The FUSE session holder in both of its ways, in this process: direct (this process serves its own copy of the
// holder's descriptor; after a detach the kernel resends what was left unanswered) and the relay (the fallback:
// the holder reads requests and writes replies, keeping unanswered ones for the next server). A mount is
// detached with a file held open and a read waiting, then served again by a new client of the same holder.

let work: string
let fixture: Fixture
let readers: FileReadAt[]
let layers: Layer[]
let image: { layers: ImageLayer[] }

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'strata-fs-holder-'))
  fixture = await makeFixture(work)
  readers = await Promise.all(fixture.blobs.map((b) => fileReader(b.path)))
  layers = await Promise.all(readers.map((r, i) => openLayer(r, { tocDigest: fixture.blobs[i]!.tocDigest })))
  image = {
    layers: layers.map((layer, i): ImageLayer => {
      const digest = `sha256:${createHash('sha256').update(readFileSync(fixture.blobs[i]!.path)).digest('hex')}`
      const mediaType = 'application/vnd.oci.image.layer.v1.tar+gzip'
      return {
        ...layer,
        descriptor: { mediaType, digest, size: layer.size },
        digest,
        ref: { digest, repository: 'localhost/fixture' },
        verified: true
      }
    })
  }
})

afterAll(async () => {
  await Promise.all((readers ?? []).map((r) => r.close()))
  if (work !== undefined) await rm(work, { recursive: true, force: true })
})

function start(cmd: string, args: string[]) {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d) => {
    stdout += d
  })
  child.stderr.on('data', (d) => {
    stderr += d
  })
  let finished = false
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
    child.on('close', (code) => {
      finished = true
      resolve({ code, stdout, stderr })
    })
  )
  return { child, done, stdout: () => stdout, finished: () => finished }
}

async function until(what: string, check: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

const sha = (file: string) =>
  createHash('sha256')
    .update(readFileSync(join(fixture.reference, file)))
    .digest('hex')

describe.each([
  ['direct', true],
  ['relay', false]
] as const)('a mount through the FUSE session holder (%s)', (way, direct) => {
  it.runIf(direct ? canServeDirectly() : true)(
    'is served again after a detach: a file held open and a read that waited get the right bytes',
    async () => {
      const storeDir = join(work, `store-${way}`)
      const store = await openDiskStore(storeDir, { fsync: false })
      for (const [i, layer] of layers.entries())
        for (const entry of layer.toc.entries.values())
          for (const chunk of entry.chunks) await store.put(chunk.digest, await readChunk(readers[i]!, layer, chunk))
      const fetcher = createFetcher({ store, sources: [], readAheadBytes: 0 })
      const holderDir = join(work, `holder-${way}`)
      const mnt = join(work, `mnt-${way}`)
      await mkdir(mnt)
      const first = await serveMount({
        image,
        fetcher,
        mountpoint: mnt,
        holder: createFuseHolder(holderDir, { direct }),
        meta: { way }
      })
      try {
        // A small file held open (passthrough, when direct), then the mount left to the holder.
        const small = 'usr/bin/ls'
        const held = start('sh', [
          '-c',
          'exec 3< "$1" && echo open && read go && sha256sum <&3',
          'sh',
          join(mnt, small)
        ])
        await until('the file to be open', () => held.stdout() === 'open\n')
        await first.detach!()
        expect(await isMounted(mnt)).toBe(true)
        // A read while nobody serves: it waits (the kernel, or the relay, keeps it).
        const reader = start('sha256sum', [join(mnt, 'data', 'big')])
        await new Promise((r) => setTimeout(r, 300))
        expect(reader.finished()).toBe(false)

        const holder = createFuseHolder(holderDir, { direct })
        const [info] = await heldMounts(holder)
        expect(info?.meta).toEqual({ way })
        expect(info?.session.direct !== undefined).toBe(direct)
        const again = await resumeMount({ image, fetcher, holder, held: info! })
        try {
          const read = await reader.done
          expect(read.stdout.slice(0, 64)).toBe(sha('data/big'))
          held.child.stdin.end('go\n')
          expect((await held.done).stdout.slice('open\n'.length, 'open\n'.length + 64)).toBe(sha(small))
          const reopened = await start('sha256sum', [join(mnt, small)]).done
          expect(reopened.stdout.slice(0, 64)).toBe(sha(small))
          expect(again.fuse?.().mode).toBe(direct ? 'passthrough' : 'off')
        } finally {
          await again.unmount()
        }
        expect(await isMounted(mnt)).toBe(false)
        expect(await holder.sessions()).toEqual([])
      } finally {
        if (await isMounted(mnt)) await first.unmount().catch(() => {})
        await store.close()
      }
    }
  )

  // Only the direct way has a session without a reader of its own: the relay test would have nothing to check.
  if (direct)
    it.runIf(canServeDirectly())(
      'lets a session go once it is unmounted while nobody serves it (it has no reader of its own to see that)',
      async () => {
        const store = await openDiskStore(join(work, `store-${way}-gone`), { fsync: false })
        const fetcher = createFetcher({ store, sources: [], readAheadBytes: 0 })
        const holderDir = join(work, `holder-${way}-gone`)
        const mnt = join(work, `mnt-${way}-gone`)
        await mkdir(mnt)
        const holder = createFuseHolder(holderDir)
        const mount = await serveMount({ image, fetcher, mountpoint: mnt, holder })
        try {
          await mount.detach!()
          expect(await holder.sessions()).toHaveLength(1)
          await start('umount', ['-l', mnt]).done
          await until('the holder to let the session go', async () => (await holder.sessions()).length === 0, 20_000)
        } finally {
          if (await isMounted(mnt)) await mount.unmount().catch(() => {})
          await store.close()
        }
      },
      30_000
    )
})
