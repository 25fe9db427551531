import { constants } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { createOperations, decodeRef, diffTree, infoOf, OPAQUE_XATTR, type StoreLayer } from '../src/index.js'
import { makeToc } from './toc.js'

const noRead = async (): Promise<number> => {
  throw new Error('no reads here')
}

describe('a layer diff for the additional layer store', () => {
  it("shows whiteouts as overlay's: 0:0 character devices and opaque directories", () => {
    const { toc } = makeToc([
      { path: 'etc/.wh.passwd' },
      { path: '.wh.tmp' },
      { path: 'opt/.wh..wh..opq' },
      { path: 'opt/new', size: 5 },
      { path: '.wh.srv' },
      { path: 'srv', type: 'dir' },
      { path: 'srv/x', size: 1 },
      { path: 'usr/.wh..wh.plnk' },
      { path: 'bin/sh', size: 3 }
    ])
    const ops = createOperations(diffTree(toc), noRead)
    expect(ops.readdir('/')).toEqual(['bin', 'etc', 'opt', 'srv', 'tmp', 'usr'])
    for (const path of ['/etc/passwd', '/tmp']) {
      const s = ops.getattr(path)
      expect(s.mode & constants.S_IFMT).toBe(constants.S_IFCHR)
      expect(s.rdev).toBe(0)
    }
    expect(ops.readdir('/etc')).toEqual(['passwd'])
    expect(ops.readdir('/usr')).toEqual([])
    expect(ops.readdir('/opt')).toEqual(['new'])
    expect(Buffer.from(ops.getxattr('/opt', OPAQUE_XATTR)).toString()).toBe('y')
    // Whited out and made again in the same layer: a directory that hides the one below.
    expect(Buffer.from(ops.getxattr('/srv', OPAQUE_XATTR)).toString()).toBe('y')
    expect(ops.readdir('/srv')).toEqual(['x'])
    expect(ops.listxattr('/etc')).toEqual([])
    // The TOC's own entries are not changed: merged trees must not show the marker.
    expect(toc.lookup('opt')!.xattrs[OPAQUE_XATTR]).toBeUndefined()
    expect(ops.getattr('/bin/sh').size).toBe(3)
  })

  it('says in info what each containers-storage reads', () => {
    const layer: StoreLayer = {
      digest: 'sha256:aa',
      descriptor: { size: 1234, annotations: { 'io.containers.estargz.uncompressed-size': '4096' } },
      format: 'estargz',
      toc: makeToc([]).toc,
      tocDigest: 'sha256:cc',
      verified: true,
      compression: 'gzip'
    }
    expect(infoOf(layer, 'sha256:dd', false)).toEqual({
      'compressed-diff-digest': 'sha256:aa',
      'compressed-size': 1234,
      'diff-digest': 'sha256:dd',
      'diff-size': 4096,
      compression: 2
    })
    expect(infoOf({ ...layer, descriptor: { size: 1234 } }, 'sha256:dd', true)).toEqual({
      'compressed-size': 1234,
      'diff-size': -1,
      compression: 2,
      'toc-digest': 'sha256:cc',
      flags: { 'expected-layer-diffid': 'sha256:dd' }
    })
  })

  it('takes image references as containers-storage names them', () => {
    const ref = 'registry.example.com:5000/app/x:1.2'
    expect(decodeRef(Buffer.from(ref).toString('base64'))).toBe(ref)
    expect(decodeRef('not base64!')).toBeUndefined()
    expect(decodeRef('YQ')).toBeUndefined() // unpadded
    expect(decodeRef(Buffer.from('a b').toString('base64'))).toBeUndefined()
  })
})
