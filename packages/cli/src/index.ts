// @strata/cli: the composition root of p2pd, p2p-mount and p2pctl; the only package that prints.
export {
  type Command,
  type Context,
  type OptionSpec,
  parseBytes,
  parseInteger,
  runCommand,
  UsageError
} from './command.js'
export { describeError, formatBytes, Output, Progress } from './output.js'
export { p2pctl } from './p2pctl.js'
