import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest'
import { PeerBook } from '../src/peers.js'

// The peer book's penalties, on a clock the test moves (vi.useFakeTimers fakes Date.now).

beforeEach(() => {
  vi.useFakeTimers({ now: 1_000_000 })
})

afterEach(() => {
  vi.useRealTimers()
})

const score = (book: PeerBook, peer = 'A') => book.snapshot().find((s) => s.peer === peer)!

/** `n` requests that were all in flight at once (started at `startedAt`), failing one after another. */
function burst(book: PeerBook, n: number, startedAt = Date.now(), peer = 'A'): void {
  for (let i = 0; i < n; i++) {
    vi.advanceTimersByTime(5)
    book.failure(peer, startedAt)
  }
}

describe('PeerBook', () => {
  it('counts a burst of concurrent failures as one failure: eight requests on one reset connection ban nobody', () => {
    const book = new PeerBook()
    burst(book, 8)
    expect(score(book).failures).toBe(1)
    expect(book.isBanned('A')).toBe(false)
    expect(book.rank(['A', 'B'])).toContain('A')
  })

  it('without start times, failures within burstMs of the last one are one incident', () => {
    const book = new PeerBook({ burstMs: 1_000 })
    for (let i = 0; i < 8; i++) {
      book.failure('A')
      vi.advanceTimersByTime(100)
    }
    expect(score(book).failures).toBe(1)
    vi.advanceTimersByTime(1_000)
    book.failure('A')
    expect(score(book).failures).toBe(2)
  })

  it('bans for sustained failure: banAfter failures in a row, each of a request started after the one before, over sustainMs', () => {
    const book = new PeerBook({ banAfter: 3, sustainMs: 5_000, firstBanMs: 10_000 })
    for (let i = 0; i < 2; i++) {
      burst(book, 4)
      vi.advanceTimersByTime(2_500)
    }
    expect(book.isBanned('A')).toBe(false)
    burst(book, 4)
    expect(book.isBanned('A')).toBe(true)
    expect(score(book).bannedUntil).toBe(Date.now() - 15 + 10_000)
    expect(book.rank(['A', 'B'])).toEqual(['B'])
  })

  it('does not ban a peer that fails a few times in a second, as one whose connection was reset does while it is dialled again', () => {
    const book = new PeerBook({ banAfter: 3, sustainMs: 5_000 })
    for (let i = 0; i < 6; i++) {
      burst(book, 8)
      vi.advanceTimersByTime(200)
    }
    expect(score(book).failures).toBe(6)
    expect(book.isBanned('A')).toBe(false)
    // Still failing 5 s after the first failure: that is sustained.
    vi.advanceTimersByTime(4_000)
    book.failure('A', Date.now())
    expect(book.isBanned('A')).toBe(true)
  })

  it('a success in between starts the count again', () => {
    const book = new PeerBook({ banAfter: 3, sustainMs: 0 })
    burst(book, 2)
    vi.advanceTimersByTime(100)
    burst(book, 2)
    book.success('A', 20, 1000)
    vi.advanceTimersByTime(100)
    burst(book, 2)
    vi.advanceTimersByTime(100)
    burst(book, 2)
    expect(score(book).failures).toBe(2)
    expect(book.isBanned('A')).toBe(false)
  })

  it('busy refusals are no failures: the peer only ranks behind the others for a moment', () => {
    const book = new PeerBook({ banAfter: 3, sustainMs: 0 })
    book.success('A', 10, 100)
    book.success('B', 30, 100)
    for (let i = 0; i < 20; i++) book.busy('A')
    expect(score(book).failures).toBe(0)
    expect(score(book).busy).toBe(20)
    expect(book.isBanned('A')).toBe(false)
    expect(book.rank(['A', 'B'])).toEqual(['B', 'A'])
    vi.advanceTimersByTime(2_000)
    expect(book.rank(['A', 'B'])).toEqual(['A', 'B'])
  })

  it('backs off: each ban in a row lasts twice as long, up to banMs', () => {
    const book = new PeerBook({ banAfter: 1, sustainMs: 0, firstBanMs: 10_000, banMs: 60_000 })
    const lengths: number[] = []
    for (let i = 0; i < 5; i++) {
      book.failure('A', Date.now())
      lengths.push(score(book).bannedUntil - Date.now())
      vi.advanceTimersByTime(score(book).bannedUntil - Date.now())
      expect(book.isBanned('A')).toBe(false)
    }
    expect(lengths).toEqual([10_000, 20_000, 40_000, 60_000, 60_000])
  })

  it('re-probes when a ban ends: one more failure bans again at once, for twice as long', () => {
    const book = new PeerBook({ banAfter: 3, sustainMs: 0, firstBanMs: 10_000 })
    for (let i = 0; i < 3; i++) {
      burst(book, 2)
      vi.advanceTimersByTime(100)
    }
    expect(book.isBanned('A')).toBe(true)
    vi.advanceTimersByTime(10_000)
    // The ban is over: the peer is asked again (it ranks), and a single failure is enough now.
    expect(book.rank(['A'])).toEqual(['A'])
    book.failure('A', Date.now())
    expect(book.isBanned('A')).toBe(true)
    expect(score(book).bannedUntil - Date.now()).toBe(20_000)
  })

  it('an answer to the probe clears the record: the next ban is the first again, after banAfter failures', () => {
    const book = new PeerBook({ banAfter: 3, sustainMs: 0, firstBanMs: 10_000 })
    for (let i = 0; i < 3; i++) {
      burst(book, 2)
      vi.advanceTimersByTime(100)
    }
    vi.advanceTimersByTime(10_000)
    book.success('A', 15, 4096)
    expect(score(book)).toMatchObject({ failures: 0, bans: 0 })
    book.failure('A', Date.now())
    expect(book.isBanned('A')).toBe(false)
  })

  it('failures of requests in flight when the ban began do not lengthen it, nor does an answer among them end it', () => {
    const book = new PeerBook({ banAfter: 2, sustainMs: 0, firstBanMs: 10_000 })
    const early = Date.now()
    burst(book, 1)
    vi.advanceTimersByTime(100)
    book.failure('A', Date.now())
    const until = score(book).bannedUntil
    vi.advanceTimersByTime(100)
    burst(book, 5, early)
    book.success('A', 200, 100)
    expect(score(book).bannedUntil).toBe(until)
    expect(book.isBanned('A')).toBe(true)
  })

  it('bans at once for bytes that failed verification, backing off from badBanMs', () => {
    const book = new PeerBook({ badBanMs: 60_000, banMs: 10 * 60_000 })
    book.success('A', 5, 100)
    book.bad('A')
    expect(score(book).bad).toBe(1)
    expect(score(book).bannedUntil - Date.now()).toBe(60_000)
    vi.advanceTimersByTime(60_000)
    expect(book.isBanned('A')).toBe(false)
    book.bad('A')
    expect(score(book).bannedUntil - Date.now()).toBe(120_000)
  })

  it('knows who answered lately, banned peers left out', () => {
    const book = new PeerBook({ banAfter: 1, sustainMs: 0 })
    book.success('A', 5, 100)
    book.success('B', 5, 100)
    vi.advanceTimersByTime(30_000)
    book.success('C', 5, 100)
    book.failure('B', Date.now())
    expect(book.answeredWithin(60_000).sort()).toEqual(['A', 'C'])
    expect(book.answeredWithin(10_000)).toEqual(['C'])
  })
})
