export { openDiskStore } from './disk.js'
export {
  InvalidDigestError,
  StoreCapError,
  StoreClosedError,
  StoreFullError,
  StoreIOError,
  StoreLockedError
} from './errors.js'
export { createMemoryStore } from './memory.js'
export type * from './types.js'
