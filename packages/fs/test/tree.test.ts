import { describe, expect, it } from 'vitest'
import { buildTree } from '../src/index.js'
import { makeToc } from './toc.js'

const names = (tree: ReturnType<typeof buildTree>, path: string) => tree.lookup(path)?.names

describe('buildTree', () => {
  it('applies whiteouts of lower layers and hides them', () => {
    const tree = buildTree([
      makeToc([
        { path: 'etc/a', size: 1 },
        { path: 'etc/b', size: 2 },
        { path: 'dir/x/y', size: 3 }
      ]),
      makeToc([{ path: 'etc/.wh.a' }, { path: '.wh.dir' }, { path: 'etc/c', size: 4 }])
    ])
    expect(names(tree, '/etc')).toEqual(['b', 'c'])
    expect(names(tree, '/')).toEqual(['etc'])
    expect(tree.lookup('/dir/x/y')).toBeUndefined()
    expect(tree.lookup('/etc/.wh.a')).toBeUndefined()
  })

  it('empties an opaque directory of the layers below but keeps its own layer', () => {
    const tree = buildTree([
      makeToc([{ path: 'opt/old', size: 1 }, { path: 'opt/sub/f', size: 1 }, { path: 'keep/k' }]),
      makeToc([{ path: 'opt/.wh..wh..opq' }, { path: 'opt/new', size: 5 }]),
      makeToc([{ path: 'opt/newer', size: 6 }])
    ])
    expect(names(tree, '/opt')).toEqual(['new', 'newer'])
    expect(names(tree, '/keep')).toEqual(['k'])
    expect(tree.lookup('/opt/sub/f')).toBeUndefined()
  })

  it('recreates a whited-out path in the same layer', () => {
    const tree = buildTree([
      makeToc([{ path: 'a/old', size: 1 }]),
      makeToc([{ path: '.wh.a' }, { path: 'a', type: 'dir', mode: 0o700 }, { path: 'a/new', size: 1 }])
    ])
    expect(names(tree, 'a')).toEqual(['new'])
    expect(tree.lookup('a')!.mode).toBe(0o700)
  })

  it('merges a directory over a directory (new attributes, old children) and replaces everything else', () => {
    const tree = buildTree([
      makeToc([
        { path: 'd', type: 'dir', mode: 0o755, uid: 1 },
        { path: 'd/one', size: 1 },
        { path: 'f', size: 10 },
        { path: 'g/inner', size: 1 }
      ]),
      makeToc([
        { path: 'd', type: 'dir', mode: 0o1777, uid: 2 },
        { path: 'd/two', size: 1 },
        { path: 'f', type: 'dir' },
        { path: 'g', type: 'symlink', linkName: '/elsewhere' }
      ])
    ])
    const d = tree.lookup('/d')!
    expect(d.names).toEqual(['one', 'two'])
    expect([d.mode, d.uid]).toEqual([0o1777, 2])
    expect(tree.lookup('/f')!.type).toBe('dir')
    expect(tree.lookup('/g')!.type).toBe('symlink')
    expect(tree.lookup('/g/inner')).toBeUndefined()
  })

  it('gives hardlinked paths one inode with the right nlink, also after a whiteout', () => {
    const layers = [
      makeToc([
        { path: 'bin/a', size: 10 },
        { path: 'bin/b', type: 'hardlink', linkName: 'bin/a' },
        { path: 'sbin/c', type: 'hardlink', linkName: 'bin/a' }
      ])
    ]
    const tree = buildTree(layers)
    const a = tree.lookup('/bin/a')!
    expect(tree.lookup('/bin/b')).toBe(a)
    expect(tree.lookup('/sbin/c')).toBe(a)
    expect(a.nlink).toBe(3)
    expect(a.source?.layer).toBe(0)
    expect(tree.inodes).toBe(4) // root, bin, sbin, the file
    expect(tree.bytes).toBe(10)

    const after = buildTree([...layers, makeToc([{ path: 'bin/.wh.b' }, { path: 'bin/a', size: 3 }])])
    expect(after.lookup('/bin/a')!.nlink).toBe(1)
    expect(after.lookup('/sbin/c')!.nlink).toBe(1)
    expect(after.lookup('/sbin/c')!.size).toBe(10)
  })

  it('links to a file of a lower layer', () => {
    const tree = buildTree([
      makeToc([{ path: 'x', size: 1 }]),
      makeToc([{ path: 'y', type: 'hardlink', linkName: 'x' }])
    ])
    expect(tree.lookup('y')).toBe(tree.lookup('x'))
    expect(tree.lookup('x')!.nlink).toBe(2)
  })

  it('refuses paths and hardlinks that escape the root or point nowhere', () => {
    expect(() => buildTree([makeToc([{ path: '../etc/passwd' }])])).toThrow(
      expect.objectContaining({ name: 'UnsafePathError', code: 'ERR_UNSAFE_PATH' })
    )
    expect(() => buildTree([makeToc([{ path: 'a/./b' }])])).toThrow(/path component '\.'/)
    expect(() => buildTree([makeToc([{ path: 'l', type: 'hardlink', linkName: '../../x' }])])).toThrow(/'\.\.'/)
    expect(() => buildTree([makeToc([{ path: 'l', type: 'hardlink', linkName: 'missing' }])])).toThrow(
      /layer 0: refusing path 'l': hardlink target 'missing' is missing/
    )
  })

  it('numbers inodes uniquely and counts subdirectories in a directory nlink', () => {
    const tree = buildTree([makeToc([{ path: 'a/b/c', size: 1 }, { path: 'a/d', type: 'dir' }, { path: 'a/e' }])])
    const inos = ['/', '/a', '/a/b', '/a/b/c', '/a/d', '/a/e'].map((p) => tree.lookup(p)!.ino)
    expect(new Set(inos).size).toBe(6)
    expect(tree.root.ino).toBe(1)
    expect(tree.lookup('/a')!.nlink).toBe(4)
    expect(tree.root.nlink).toBe(3)
  })

  it('lists directories in sorted order', () => {
    const tree = buildTree([makeToc([{ path: 'z' }, { path: 'B' }, { path: 'a' }, { path: '_' }])])
    expect(tree.root.names).toEqual(['B', '_', 'a', 'z'])
  })
})
