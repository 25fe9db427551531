/**
 * Container start through containerd with strata as its snapshotter, against containerd's own overlayfs:
 * time from `pull` to the command's output, and what the registry (behind the WAN emulator) sent.
 *
 *   node --no-warnings test/containerd/bench.ts [--runs 3] [--rtt-ms 20] [--mbit 100] [--docs]
 *
 * Needs root, containerd and runc, and ctr-remote (scripts/setup.sh builds it). Like test/bench/run.ts it runs
 * the CLIs from dist and loads the helpers through test/helpers/ts-loader.mjs.
 */
import { execFileSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { registerStrataHooks } from '../helpers/ts-loader.mjs'

const root = fileURLToPath(new URL('../..', import.meta.url))
registerStrataHooks({ strata: 'dist' })
execFileSync('pnpm', ['exec', 'turbo', 'run', 'build', '--filter', '@strata/cli...', '--output-logs=errors-only'], {
  cwd: root,
  stdio: ['ignore', 'ignore', 'inherit']
})
const { main } = await import('./bench-main.js')
process.exitCode = await main(process.argv.slice(2))
