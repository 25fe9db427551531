import { PassThrough } from 'node:stream'
import { type Command, Output, p2pctl, runCommand } from '@strata/cli'

export interface CliResult {
  code: number
  stdout: string
  /** stdout as bytes (for commands that write binary data, like `stargz cat`). */
  stdoutBytes: Buffer
  stderr: string
}

/** Runs a command tree in-process (p2pctl by default) with its output captured. */
export async function runCli(argv: string[], command: Command = p2pctl): Promise<CliResult> {
  const stdout = new PassThrough()
  const stderr = new PassThrough()
  const outChunks: Buffer[] = []
  const errChunks: Buffer[] = []
  stdout.on('data', (d: Buffer) => outChunks.push(d))
  stderr.on('data', (d: Buffer) => errChunks.push(d))
  const code = await runCommand(command, argv, new Output(stdout, stderr))
  const stdoutBytes = Buffer.concat(outChunks)
  return { code, stdout: stdoutBytes.toString(), stdoutBytes, stderr: Buffer.concat(errChunks).toString() }
}
