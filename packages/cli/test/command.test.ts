import { runCli } from '@test/cli.js'
import { describe, expect, it } from 'vitest'
import { type Command, parseBytes } from '../src/index.js'

const tree: Command = {
  name: 'tool',
  summary: 'a tool',
  options: { socket: { type: 'string', description: 'socket' } },
  subcommands: [
    {
      name: 'echo',
      summary: 'prints its argument',
      usage: 'WORD',
      args: { min: 1, max: 1 },
      options: { json: { type: 'boolean', description: 'json' } },
      run: ({ args, opts, out }) => {
        out.fields({ word: args[0], socket: opts.socket })
        return 0
      }
    },
    {
      name: 'fail',
      summary: 'fails',
      run: () => {
        throw new Error('it broke', { cause: new Error('the disk is full') })
      }
    }
  ]
}

describe('command parser', () => {
  it('runs a subcommand with root options and --json', async () => {
    const r = await runCli(['echo', 'hi', '--socket', '/s', '--json'], tree)
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout)).toEqual({ word: 'hi', socket: '/s' })
  })

  it('takes root options before the command name too', async () => {
    for (const argv of [
      ['--socket', '/s', 'echo', 'hi'],
      ['--socket=/s', 'echo', 'hi']
    ]) {
      const r = await runCli([...argv, '--json'], tree)
      expect(r.code).toBe(0)
      expect(JSON.parse(r.stdout)).toEqual({ word: 'hi', socket: '/s' })
    }
  })

  it('prints help with exit 0 for --help on every level', async () => {
    for (const argv of [['--help'], ['echo', '--help'], ['fail', '-h']]) {
      const r = await runCli(argv, tree)
      expect(r.code).toBe(0)
      expect(r.stdout).toMatch(/^Usage: tool/)
    }
  })

  it('exits 2 on usage errors and names the problem', async () => {
    const cases: [string[], RegExp][] = [
      [['nope'], /unknown command 'nope'/],
      [['echo'], /missing arguments/],
      [['echo', 'a', 'b'], /unexpected argument 'b'/],
      [['echo', 'a', '--bogus'], /bogus/]
    ]
    for (const [argv, msg] of cases) {
      const r = await runCli(argv, tree)
      expect(r.code).toBe(2)
      expect(r.stderr).toMatch(msg)
    }
  })

  it('exits 1 on failure and prints the cause chain', async () => {
    const r = await runCli(['fail'], tree)
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('error: it broke: the disk is full')
  })

  it('parses byte counts', () => {
    expect(parseBytes('4MiB')).toBe(4 * 1024 * 1024)
    expect(parseBytes('512k')).toBe(512 * 1024)
    expect(parseBytes('10')).toBe(10)
    expect(() => parseBytes('ten')).toThrow(/not a byte count/)
  })
})
