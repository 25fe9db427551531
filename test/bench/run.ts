/**
 * The end-to-end benchmark suite (`pnpm bench`): cold lazy start vs full pull, a warm peer, a fleet of cold
 * nodes, cluster warm-up. Runs the product's CLIs (p2pd, p2p-mount, p2pctl) as separate processes against a
 * real registry behind a WAN emulator. See test/bench/README.md.
 *
 *   node --no-warnings test/bench/run.ts [--small] [--images python3,gcc,node] [--nodes 10] [--rtt-ms 20] [--mbit 100]
 *
 * Plain node runs TypeScript (type stripping); the repo's sources and helpers use `.js` specifiers as
 * vitest resolves them, and the helpers import `@strata/<name>`, which only the CLI package depends on.
 * These hooks map both, before anything else is imported.
 */
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { registerHooks } from 'node:module'
import { fileURLToPath, pathToFileURL } from 'node:url'

const root = fileURLToPath(new URL('../..', import.meta.url))

registerHooks({
  resolve(specifier, context, next) {
    try {
      return next(specifier, context)
    } catch (err) {
      if (specifier.startsWith('.') && specifier.endsWith('.js')) return next(`${specifier.slice(0, -3)}.ts`, context)
      const pkg = /^@strata\/([a-z]+)$/.exec(specifier)?.[1]
      const dist = `${root}packages/${pkg}/dist/index.js`
      if (pkg !== undefined && existsSync(dist)) return next(pathToFileURL(dist).href, context)
      throw err
    }
  }
})

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
