import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { IdentityError, PreSharedKeyError } from './errors.js'

/** The node's persistent identity: `peer.key` in the data dir (mode 0600), made on first start. */
export async function loadIdentity(dataDir: string): Promise<PrivateKey> {
  const path = join(dataDir, 'peer.key')
  let bytes: Uint8Array
  try {
    bytes = await readFile(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new IdentityError(path, { cause: err })
    const key = await generateKeyPair('Ed25519')
    await mkdir(dataDir, { recursive: true })
    await writeFile(path, privateKeyToProtobuf(key), { mode: 0o600, flag: 'wx' })
    await chmod(path, 0o600)
    return key
  }
  try {
    return privateKeyFromProtobuf(bytes)
  } catch (err) {
    throw new IdentityError(path, { cause: err })
  }
}

/** The pre-shared key of a private network, checked for the swarm-key form before libp2p sees it. */
export async function loadPreSharedKey(path: string): Promise<Uint8Array> {
  let bytes: Buffer
  try {
    bytes = await readFile(path)
  } catch (err) {
    throw new PreSharedKeyError(path, { cause: err })
  }
  const lines = bytes.toString('utf8').trim().split(/\r?\n/)
  if (lines[0] !== '/key/swarm/psk/1.0.0/' || lines[1] !== '/base16/' || !/^[0-9a-fA-F]{64}$/.test(lines[2] ?? '')) {
    throw new PreSharedKeyError(path)
  }
  return bytes
}
