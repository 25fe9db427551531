/**
 * Container starts through containerd with strata as its snapshotter, against containerd's own overlayfs: time
 * from the pull (ctr, ctr-remote, CRI) to the command's exit, a second container of a pulled image, and what the
 * registry (behind the WAN emulator) sent. Images: the end-to-end bench's (test/bench/images.ts).
 *
 *   node --no-warnings test/containerd/bench.ts [--images python3,gcc,node] [--runs 3] [--docs] [--from FILE]
 *
 * Needs root, containerd and runc, skopeo, debootstrap (once, for the images' cache) and ctr-remote
 * (scripts/setup.sh builds it). Like test/bench/run.ts it runs the CLIs from dist and loads the helpers through
 * test/helpers/ts-loader.mjs. `--help` lists the options.
 */
import { execFileSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { registerStrataHooks } from '../helpers/ts-loader.mjs'

const root = fileURLToPath(new URL('../..', import.meta.url))
registerStrataHooks({ strata: 'dist' })
const argv = process.argv.slice(2)
if (!argv.includes('--from') && !argv.includes('--help') && !argv.includes('-h')) {
  execFileSync('pnpm', ['exec', 'turbo', 'run', 'build', '--filter', '@strata/cli...', '--output-logs=errors-only'], {
    cwd: root,
    stdio: ['ignore', 'ignore', 'inherit']
  })
}
const { main } = await import('./bench-main.js')
process.exitCode = await main(argv)
