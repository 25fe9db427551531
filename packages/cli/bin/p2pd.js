#!/usr/bin/env node
import { main } from '../dist/p2pd.js'

process.exitCode = await main(process.argv.slice(2))
// A finished command must not be held open by a keep-alive socket or a stray timer.
setTimeout(() => process.exit(), 1500).unref()
