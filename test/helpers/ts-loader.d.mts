/** See ts-loader.mjs: resolve hooks that let plain `node` run the repo's TypeScript. */
export function registerStrataHooks(options: { strata: 'src' | 'dist' }): void
