import { createMemoryStore } from '../src/index.js'
import { runStoreCompliance } from './compliance.js'

runStoreCompliance('memory', async (init) => createMemoryStore(init))
