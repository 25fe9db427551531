import { CID } from 'multiformats/cid'
import * as Digest from 'multiformats/hashes/digest'
import { sha256 } from 'multiformats/hashes/sha2'

const RAW = 0x55

/** The DHT key of a `sha256:<hex>` digest: CIDv1, raw codec, the digest's 32 bytes as a sha2-256 multihash. */
export function digestToCid(digest: string): CID {
  const m = /^sha256:([0-9a-f]{64})$/.exec(digest)
  if (m === null) throw new TypeError(`not a sha256 digest: ${digest}`)
  return CID.createV1(RAW, Digest.create(sha256.code, Buffer.from(m[1]!, 'hex')))
}
