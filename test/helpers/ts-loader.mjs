// Lets plain `node` run the repo's TypeScript outside vitest (benchmarks, child processes of tests): Node strips
// the types, and these resolve hooks map the specifiers the sources use as vitest resolves them.
// Plain JavaScript, so node loads it before any hook exists.
import { existsSync, readFileSync } from 'node:fs'
import { registerHooks } from 'node:module'
import { fileURLToPath } from 'node:url'

const root = new URL('../../', import.meta.url)

/**
 * The file `@strata/<name>[/<subpath>]` stands for: the export `packages/<name>/package.json` gives it (a
 * `./dist/<x>.js`), or with `strata: 'src'` the `./src/<x>.ts` it is built from.
 */
function strataFile(name, subpath, strata) {
  const pkg = new URL(`packages/${name}/`, root)
  const manifest = new URL('package.json', pkg)
  if (!existsSync(manifest)) throw new Error(`@strata/${name}: no package at ${fileURLToPath(pkg)}`)
  const key = subpath === undefined ? '.' : `./${subpath}`
  const target = JSON.parse(readFileSync(manifest, 'utf8')).exports?.[key]?.default
  if (typeof target !== 'string') throw new Error(`@strata/${name}: ${fileURLToPath(manifest)} exports no "${key}"`)
  const file =
    strata === 'src' ? new URL(target.replace(/^\.\/dist\/(.*)\.js$/, './src/$1.ts'), pkg) : new URL(target, pkg)
  if (!existsSync(file)) {
    const hint = strata === 'dist' ? `: build it (pnpm exec turbo run build --filter @strata/${name})` : ''
    throw new Error(`@strata/${name}${subpath === undefined ? '' : `/${subpath}`}: no ${fileURLToPath(file)}${hint}`)
  }
  return file.href
}

/**
 * Registers the hooks in this thread; call it before importing any TypeScript (with `await import(...)`), or
 * from a module given to `node --import`. Maps:
 * - `@strata/<name>` and its subpaths (`@strata/node/client`) to the package's `src/*.ts` (`strata: 'src'`) or
 *   its built `dist/*.js` (`strata: 'dist'`: for code Node cannot strip, such as parameter properties, unless
 *   node runs with --experimental-transform-types);
 * - `@test/<x>.js` to `test/helpers/<x>.ts`;
 * - a relative `./x.js` imported by a `.ts` file to the `./x.ts` beside it.
 * @param {{ strata: 'src' | 'dist' }} options
 */
export function registerStrataHooks(options) {
  const { strata } = options
  if (strata !== 'src' && strata !== 'dist') throw new TypeError(`registerStrataHooks: strata is 'src' or 'dist'`)
  registerHooks({
    resolve(specifier, context, next) {
      const pkg = /^@strata\/([a-z]+)(?:\/([a-z-]+))?$/.exec(specifier)
      if (pkg !== null) return next(strataFile(pkg[1], pkg[2], strata), context)
      if (specifier.startsWith('@test/')) {
        return next(new URL(`test/helpers/${specifier.slice(6).replace(/\.js$/, '.ts')}`, root).href, context)
      }
      if (/^\.\.?\//.test(specifier) && specifier.endsWith('.js') && context.parentURL?.endsWith('.ts')) {
        const ts = new URL(`${specifier.slice(0, -3)}.ts`, context.parentURL)
        if (existsSync(ts)) return next(ts.href, context)
      }
      return next(specifier, context)
    }
  })
}
