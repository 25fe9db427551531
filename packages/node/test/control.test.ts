import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createMemoryStore } from '@strata/store'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Announcer } from '../src/announcer.js'
import {
  type ControlServer,
  createControlClient,
  createNode,
  type MetricsServer,
  type NodeStatus,
  type StrataNode,
  startControlServer,
  startMetricsServer
} from '../src/index.js'

describe('control API and metrics', () => {
  let dir: string
  let node: StrataNode
  let control: ControlServer
  let metrics: MetricsServer
  const store = createMemoryStore()

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'strata-control-'))
    node = await createNode({ store, dataDir: join(dir, 'data'), listen: ['/ip4/127.0.0.1/tcp/0'] })
    control = await startControlServer(node, { socket: join(dir, 'run', 'p2pd.sock') })
    metrics = await startMetricsServer(node, { listen: '127.0.0.1:0' })
  })

  afterAll(async () => {
    await control?.close()
    await metrics?.close()
    await node?.stop()
    await rm(dir, { recursive: true, force: true })
  })

  it('answers status on a socket only its owner and group can use', async () => {
    expect((await stat(control.socket)).mode & 0o777).toBe(0o660)
    const s = await createControlClient(control.socket).get<NodeStatus>('/status')
    expect(s.peerId).toBe(node.peerId)
    expect(s.addrs[0]).toMatch(/^\/ip4\/127\.0\.0\.1\/tcp\/\d+\/p2p\//)
    expect(s.bytes).toMatchObject({ served: 0, fetched: { peer: 0, registry: 0 } })
  })

  it('reports errors with their name, and takes routes added by other packages', async () => {
    const client = createControlClient(control.socket)
    await expect(client.get('/nothing')).rejects.toMatchObject({ name: 'NotFound' })
    await expect(client.stream('/warm', {}, () => {})).rejects.toMatchObject({ name: 'BadRequest' })
    control.route('POST', /\/mounts\/([a-z]+)/, async ({ match, body }) => ({ mount: match[1], body }))
    expect(await client.post('/mounts/abc', { x: 1 })).toEqual({ mount: 'abc', body: { x: 1 } })
  })

  it('refuses a second server on a socket in use, and says p2pd is not running on a dead one', async () => {
    await expect(startControlServer(node, { socket: control.socket })).rejects.toMatchObject({
      name: 'ControlSocketError'
    })
    await expect(createControlClient(join(dir, 'none.sock')).get('/status')).rejects.toMatchObject({
      name: 'ControlUnavailableError',
      hint: expect.stringContaining('p2pd')
    })
  })

  it('serves Prometheus text with the store, peers and provide backlog', async () => {
    await store.put(`sha256:${'0'.repeat(64)}`, new Uint8Array(10))
    const text = await (await fetch(`http://${metrics.address}/metrics`)).text()
    expect(text).toMatch(/^strata_store_chunks 1$/m)
    expect(text).toMatch(/^strata_peers 0$/m)
    expect(text).toMatch(/^strata_dht_provide_backlog \d+$/m)
  })
})

describe('announcer', () => {
  it('announces coarse keys first, a few at a time, and stops announcing what was withdrawn', async () => {
    const order: string[] = []
    let running = 0
    let most = 0
    const withdrawn: string[] = []
    const a = new Announcer({
      concurrency: 2,
      ratePerSecond: 1000,
      provide: async (d) => {
        running++
        most = Math.max(most, running)
        order.push(d)
        await new Promise((r) => setTimeout(r, 5))
        running--
        return true
      },
      withdraw: (d) => withdrawn.push(d)
    })
    for (let i = 0; i < 10; i++) a.announce(`chunk${i}`)
    a.withdraw(['chunk9'])
    a.announceNow('layer')
    a.start()
    // A coarse key known later does not wait for the chunk keys' slots: it starts at once, in a slot of its own.
    a.announceNow('toc')
    expect(order).toHaveLength(4)
    expect(order).toEqual(expect.arrayContaining(['layer', 'toc']))
    await a.settled()
    a.stop()
    expect(order).not.toContain('chunk9')
    expect(withdrawn).toEqual(['chunk9'])
    // Two chunk keys and the coarse keys (two slots of their own) at most.
    expect(most).toBeLessThanOrEqual(4)
    expect(most).toBeGreaterThanOrEqual(3)
    expect(a.stats()).toMatchObject({ backlog: 0, landed: 11, failed: 0 })
  })

  it('keeps the rate limit and retries what did not land', async () => {
    let calls = 0
    const a = new Announcer({
      ratePerSecond: 20,
      retryMs: 50,
      provide: async () => ++calls > 1
    })
    const started = Date.now()
    a.start()
    for (let i = 0; i < 30; i++) a.announce(`k${i}`)
    await a.settled()
    a.stop()
    // 30 keys + 1 retry at 20/s with a burst of 20: at least half a second.
    expect(Date.now() - started).toBeGreaterThanOrEqual(450)
    expect(a.stats()).toMatchObject({ landed: 30, failed: 1, backlog: 0 })
  })
})
