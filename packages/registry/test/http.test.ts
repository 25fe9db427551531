import { createHash } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { createRegistryClient, type RegistryClientInit } from '../src/index.js'

// The HTTP core and token flow against a fake `fetch`: statuses, redirects, retries and tokens, with no server.

interface Seen {
  url: string
  method: string
  headers: Record<string, string>
}

type Answer = (req: Seen) => Response | Promise<Response>

/** A client whose every request is answered by `answer`; `seen` records them in order. */
function fake(answer: Answer, init: RegistryClientInit = {}) {
  const seen: Seen[] = []
  const fetch = (async (input: URL | string, options: RequestInit = {}) => {
    const req = {
      url: String(input),
      method: options.method ?? 'GET',
      headers: { ...(options.headers as Record<string, string>) }
    }
    seen.push(req)
    return answer(req)
  }) as typeof globalThis.fetch
  const client = createRegistryClient({ dockerConfig: false, backoffMs: 1, fetch, ...init })
  return { client, seen }
}

const BLOB = new TextEncoder().encode('the bytes of a blob, forty-two of them...')
const DIGEST = `sha256:${createHash('sha256').update(BLOB).digest('hex')}`
const REF = 'registry.test/team/app:1'
const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } })

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; status?: number; hint?: string }> {
  try {
    await p
  } catch (err) {
    return err as Error & { code?: string; status?: number; hint?: string }
  }
  throw new Error('expected a rejection')
}

describe('statuses', () => {
  it('maps registry error codes and statuses to typed errors, naming what they are about', async () => {
    const cases: Array<[Response, string, string]> = [
      [json(404, { errors: [{ code: 'BLOB_UNKNOWN', message: 'no' }] }), 'BlobUnknownError', 'ERR_BLOB_UNKNOWN'],
      [json(404, { errors: [{ code: 'NAME_UNKNOWN', message: 'no' }] }), 'NameUnknownError', 'ERR_NAME_UNKNOWN'],
      [json(403, { errors: [{ code: 'DENIED', message: 'no' }] }), 'DeniedError', 'ERR_DENIED'],
      [new Response('', { status: 418 }), 'UnexpectedResponseError', 'ERR_UNEXPECTED_RESPONSE']
    ]
    for (const [res, name, code] of cases) {
      const { client } = fake(() => res.clone())
      const err = await rejection(client.fetchBlob(REF, DIGEST))
      expect(err).toMatchObject({ name, code })
      expect(err.message).toContain(`registry.test/team/app@${DIGEST}`)
      expect(err).toBeInstanceOf(Error)
    }
  })

  it('asks again after a 5xx, then fails with RegistryUnavailableError saying how often it tried', async () => {
    let n = 0
    const flaky = fake(() => (++n < 3 ? new Response('busy', { status: 503 }) : new Response(BLOB)), { retries: 3 })
    expect(Buffer.from(await flaky.client.fetchBlob(REF, DIGEST)).equals(Buffer.from(BLOB))).toBe(true)
    expect(flaky.seen).toHaveLength(3)

    const down = fake(() => new Response('down', { status: 502 }), { retries: 2 })
    const err = await rejection(down.client.fetchBlob(REF, DIGEST))
    expect(err).toMatchObject({ name: 'RegistryUnavailableError', status: 502 })
    expect(err.message).toContain('(after 3 attempts)')
    expect(down.seen).toHaveLength(3)
  })

  it('does not retry what asking again cannot fix (a 404)', async () => {
    const { client, seen } = fake(() => json(404, { errors: [{ code: 'BLOB_UNKNOWN' }] }))
    expect(await client.blobExists(REF, DIGEST)).toBe(false)
    expect(seen).toHaveLength(1)
    expect(seen[0]!.method).toBe('HEAD')
  })

  it('fails at once when a 429 asks to wait longer than maxRetryAfterMs', async () => {
    const { client, seen } = fake(() => new Response('', { status: 429, headers: { 'retry-after': '120' } }), {
      maxRetryAfterMs: 1000
    })
    const err = await rejection(client.fetchBlob(REF, DIGEST))
    expect(err.name).toBe('TooManyRequestsError')
    expect(err.message).toContain('asks to wait 120 s')
    expect(seen).toHaveLength(1)
  })

  it('retries a body cut short of its Content-Length as a ShortReadError', async () => {
    let n = 0
    const { client, seen } = fake(() =>
      ++n === 1
        ? new Response(BLOB.subarray(0, 10), { headers: { 'content-length': String(BLOB.length) } })
        : new Response(BLOB)
    )
    expect(Buffer.from(await client.fetchBlob(REF, DIGEST)).equals(Buffer.from(BLOB))).toBe(true)
    expect(seen).toHaveLength(2)
  })
})

describe('redirects', () => {
  it("follows a blob's redirect to storage without the registry's Authorization, and goes there directly next time", async () => {
    const { client, seen } = fake(
      (req) => {
        if (req.url.startsWith('https://storage.test/')) return new Response(BLOB)
        if (req.headers.authorization === undefined) {
          return new Response('', { status: 401, headers: { 'www-authenticate': 'Basic realm="r"' } })
        }
        return new Response('', { status: 307, headers: { location: 'https://storage.test/signed?x=1' } })
      },
      { credentials: { 'registry.test': { username: 'u', password: 'p' } } }
    )
    await client.fetchBlob(REF, DIGEST)
    expect(seen.map((r) => r.url)).toEqual([
      `https://registry.test/v2/team/app/blobs/${DIGEST}`,
      `https://registry.test/v2/team/app/blobs/${DIGEST}`,
      'https://storage.test/signed?x=1'
    ])
    expect(seen[1]!.headers.authorization).toMatch(/^Basic /)
    expect(seen[2]!.headers.authorization).toBeUndefined()
    await client.fetchBlob(REF, DIGEST)
    expect(seen.slice(3).map((r) => r.url)).toEqual(['https://storage.test/signed?x=1'])
  })

  it('resolves the blob again once when its storage URL has expired', async () => {
    let signed = 0
    const { client, seen } = fake((req) => {
      if (req.url.startsWith('https://storage.test/')) {
        return ++signed === 2 ? new Response('expired', { status: 403 }) : new Response(BLOB)
      }
      return new Response('', { status: 307, headers: { location: `https://storage.test/${signed}` } })
    })
    await client.fetchBlob(REF, DIGEST)
    await client.fetchBlob(REF, DIGEST)
    expect(seen.map((r) => new URL(r.url).host)).toEqual([
      'registry.test',
      'storage.test',
      'storage.test',
      'registry.test',
      'storage.test'
    ])
  })

  it('gives up after five redirects', async () => {
    let hop = 0
    const { client } = fake(() => new Response('', { status: 302, headers: { location: `/v2/loop/${++hop}` } }))
    const err = await rejection(client.fetchBlob(REF, DIGEST))
    expect(err).toMatchObject({ name: 'UnexpectedResponseError' })
    expect(err.message).toContain('more than 5 redirects')
  })
})

describe('the token flow', () => {
  it('answers a Bearer challenge with one token for concurrent requests, and reuses it', async () => {
    let tokens = 0
    const { client, seen } = fake(async (req) => {
      const url = new URL(req.url)
      if (url.host === 'auth.test') {
        expect(url.searchParams.get('service')).toBe('registry.test')
        expect(url.searchParams.getAll('scope')).toEqual(['repository:team/app:pull'])
        await new Promise((r) => setTimeout(r, 20))
        return json(200, { token: `t${++tokens}`, expires_in: 300 })
      }
      if (req.headers.authorization !== 'Bearer t1') {
        return new Response('', {
          status: 401,
          headers: {
            'www-authenticate':
              'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:team/app:pull"'
          }
        })
      }
      return new Response(BLOB)
    })
    await Promise.all([client.fetchBlob(REF, DIGEST), client.fetchBlob(REF, DIGEST)])
    expect(tokens).toBe(1)
    const before = seen.length
    await client.fetchBlob(REF, DIGEST)
    expect(seen.slice(before).map((r) => r.headers.authorization)).toEqual(['Bearer t1'])
  })

  it('names a token server that refuses anonymous access, with a hint to log in', async () => {
    const { client } = fake((req) =>
      new URL(req.url).host === 'auth.test'
        ? new Response('', { status: 401 })
        : new Response('', { status: 401, headers: { 'www-authenticate': 'Bearer realm="https://auth.test/t"' } })
    )
    const err = await rejection(client.fetchBlob(REF, DIGEST))
    expect(err).toMatchObject({ name: 'UnauthorizedError', code: 'ERR_UNAUTHORIZED', status: 401 })
    expect(err.message).toContain('https://auth.test refused anonymous access (401)')
    expect(err.hint).toContain('docker login registry.test')
  })
})

describe('ranges', () => {
  it('serves every run of a call from one whole-blob 200 and remembers that the registry ignores Range', async () => {
    const { client, seen } = fake(() => new Response(BLOB, { headers: { 'content-length': String(BLOB.length) } }))
    const blob = client.blob(REF, DIGEST)
    expect(blob.ignoresRange).toBe(false)
    const runs = [
      { offset: 21, length: 5 },
      { offset: 0, length: 4 },
      { offset: 40, length: 10 }
    ]
    const got: Uint8Array[] = []
    await blob.readRuns(runs, (i, bytes) => {
      got[i] = bytes
    })
    // The last run reaches past the end of the blob: it comes back short.
    expect(got.map((b) => Buffer.from(b).toString())).toEqual(['forty', 'the ', '.'])
    expect(seen).toHaveLength(1)
    expect(seen[0]!.headers.range).toBe('bytes=0-3')
    expect(blob.ignoresRange).toBe(true)
    expect(blob.size).toBe(BLOB.length)
    // Known now: the next call asks once, for the span of its runs.
    await blob.readRuns(runs, () => {})
    expect(seen.slice(1).map((r) => r.headers.range)).toEqual(['bytes=0-40'])
  })

  it('joins a later call to the whole-blob read in flight when it has not passed its runs; one that has asks anew', async () => {
    const pieces: Array<ReadableStreamDefaultController<Uint8Array>> = []
    const { client, seen } = fake(
      () =>
        new Response(
          new ReadableStream<Uint8Array>({
            start(controller) {
              pieces.push(controller)
            }
          }),
          { headers: { 'content-length': String(BLOB.length) } }
        )
    )
    const blob = client.blob(REF, DIGEST, BLOB.length)
    const text = (b: Uint8Array) => Buffer.from(b).toString()
    const got: string[] = []
    const first = blob.readRuns([{ offset: 0, length: 4 }], (_, b) => got.push(`first ${text(b)}`))
    await new Promise((r) => setTimeout(r, 10))
    expect(seen).toHaveLength(1)
    pieces[0]!.enqueue(BLOB.subarray(0, 10))
    await first
    // Its runs delivered, nobody waits on that read: it stopped after 10 bytes.
    expect(got).toEqual(['first the '])
    // A new whole read; while it is at byte 10, a call for bytes past it joins, one for bytes before asks anew.
    const second = blob.readRuns([{ offset: 21, length: 5 }], (_, b) => got.push(`second ${text(b)}`))
    await new Promise((r) => setTimeout(r, 10))
    expect(seen).toHaveLength(2)
    pieces[1]!.enqueue(BLOB.subarray(0, 10))
    await new Promise((r) => setTimeout(r, 10))
    const joined = blob.readRuns([{ offset: 31, length: 2 }], (_, b) => got.push(`joined ${text(b)}`))
    const behind = blob.readRuns([{ offset: 4, length: 5 }], (_, b) => got.push(`behind ${text(b)}`))
    await new Promise((r) => setTimeout(r, 10))
    expect(seen).toHaveLength(3)
    pieces[1]!.enqueue(BLOB.subarray(10))
    pieces[1]!.close()
    await Promise.all([second, joined])
    pieces[2]!.enqueue(BLOB)
    pieces[2]!.close()
    await behind
    expect(got.slice(1).sort()).toEqual(['behind bytes', 'joined of', 'second forty'])
  })

  it('refuses a 206 whose Content-Range is not the range asked', async () => {
    const { client } = fake(
      () => new Response(BLOB.subarray(0, 4), { status: 206, headers: { 'content-range': `bytes 1-4/${BLOB.length}` } })
    )
    const err = await rejection(client.blob(REF, DIGEST).readAt(0, 4))
    expect(err).toMatchObject({ name: 'UnexpectedResponseError' })
  })
})
