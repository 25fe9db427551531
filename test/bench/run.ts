/**
 * The end-to-end benchmark suite (`pnpm bench`): cold lazy start vs full pull, a warm peer, a fleet of cold
 * nodes, cluster warm-up. Runs the product's CLIs (p2pd, p2p-mount, p2pctl) as separate processes against a
 * real registry behind a WAN emulator. See test/bench/README.md.
 *
 *   node --no-warnings test/bench/run.ts [--small] [--images python3,gcc,node] [--nodes 10] [--rtt-ms 20] [--mbit 100]
 *
 * Plain node runs TypeScript (type stripping); test/helpers/ts-loader.mjs maps the `.js` specifiers of the
 * suite and its helpers, and their `@strata/<name>` imports (only the CLI package depends on those), before
 * anything else is imported. `@strata/*` come from dist: some sources use parameter properties, which type
 * stripping cannot run, and the CLIs the suite starts run from dist too.
 */
import { execFileSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { registerStrataHooks } from '../helpers/ts-loader.mjs'

const root = fileURLToPath(new URL('../..', import.meta.url))

registerStrataHooks({ strata: 'dist' })

// The suite runs the CLIs from dist: build them (and what they depend on) first; turbo skips what is current.
const measures = !process.argv.some((a) => a === '--help' || a === '-h' || a.startsWith('--from'))
if (measures) {
  process.stderr.write('building the CLI\n')
  execFileSync('pnpm', ['exec', 'turbo', 'run', 'build', '--filter', '@strata/cli...', '--output-logs=errors-only'], {
    cwd: root,
    stdio: ['ignore', 'ignore', 'inherit']
  })
}
const { main } = await import('./main.js')
process.exitCode = await main(process.argv.slice(2))
