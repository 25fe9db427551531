import { fileURLToPath } from 'node:url'
import { defineConfig } from 'vitest/config'

const pkg = (name: string) => fileURLToPath(new URL(`./packages/${name}/src/index.ts`, import.meta.url))

export default defineConfig({
  resolve: {
    // Tests run against the sources, so a change needs no build before `vitest`.
    alias: Object.fromEntries([
      // A subpath first: the package's alias below would also match it.
      ['@strata/node/client', fileURLToPath(new URL('./packages/node/src/client.ts', import.meta.url))],
      ['@strata/registry/reference', fileURLToPath(new URL('./packages/registry/src/reference.ts', import.meta.url))],
      ...['base', 'native', 'stargz', 'registry', 'store', 'fetcher', 'node', 'fs', 'mounts', 'snapshotter', 'cli'].map(
        (n) => [`@strata/${n}`, pkg(n)]
      ),
      ['@test', fileURLToPath(new URL('./test/helpers', import.meta.url))]
    ])
  },
  test: {
    include: ['packages/*/test/**/*.test.ts', 'test/**/*.test.ts'],
    exclude: ['**/node_modules/**', 'test/bench/**'],
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 120_000,
    reporters: ['default']
  }
})
