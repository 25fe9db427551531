import { describe, expect, it } from 'vitest'
import { parseReference } from '../src/index.js'

const D = `sha256:${'a'.repeat(64)}`

describe('parseReference', () => {
  it.each([
    ['ubuntu', 'docker.io', 'library/ubuntu', 'latest', undefined],
    ['ubuntu:24.04', 'docker.io', 'library/ubuntu', '24.04', undefined],
    ['index.docker.io/foo/bar', 'docker.io', 'foo/bar', 'latest', undefined],
    ['ghcr.io/org/app/sub:v1', 'ghcr.io', 'org/app/sub', 'v1', undefined],
    ['localhost/app', 'localhost', 'app', 'latest', undefined],
    ['localhost:5000/app:1', 'localhost:5000', 'app', '1', undefined],
    ['127.0.0.1:5000/a/b@' + D, '127.0.0.1:5000', 'a/b', undefined, D],
    ['reg.example.com:443/x:t@' + D, 'reg.example.com:443', 'x', 't', D],
    ['my_org/some-app__x', 'docker.io', 'my_org/some-app__x', 'latest', undefined]
  ])('%s', (input, registry, repository, tag, digest) => {
    const r = parseReference(input)
    expect(r.registry).toBe(registry)
    expect(r.repository).toBe(repository)
    expect(r.tag).toBe(tag)
    expect(r.digest).toBe(digest)
    expect(parseReference(r.toString()).toString()).toBe(r.toString())
  })

  it('prints the full form', () => {
    expect(parseReference('ubuntu').toString()).toBe('docker.io/library/ubuntu:latest')
    expect(parseReference(`localhost:5000/app@${D}`).toString()).toBe(`localhost:5000/app@${D}`)
  })

  it.each([
    ['', /empty/],
    ['Ubuntu', /lowercase/],
    ['host:5000/app:bad tag', /tag/],
    ['app@sha256:abc', /64 lowercase hex/],
    ['app@nodigest', /not a digest/],
    ['localhost:5000/', /repository name is missing/],
    ['a//b', /not a valid repository path component/]
  ])('rejects %j', (input, why) => {
    let err: unknown
    try {
      parseReference(input)
    } catch (e) {
      err = e
    }
    expect((err as Error).name).toBe('InvalidReferenceError')
    expect((err as Error).message).toMatch(why)
    expect((err as { hint?: string }).hint).toMatch(/REPOSITORY/)
  })
})
