import { parseTOC } from '../src/index.js'

/**
 * Tars written byte by byte (ustar headers, PAX and GNU long-name extensions), for inputs no tar tool makes:
 * entries named out of their root, hardlinks to files outside it. Shared by the builder's and convert's tests.
 */

const BLOCK = 512

export interface TarEntry {
  name: string
  /** '0' file (default), '1' hardlink, '2' symlink, '5' dir. */
  type?: string
  link?: string
  content?: string
  /** ustar prefix field (the name is `${prefix}/${name}`). */
  prefix?: string
  /** PAX records before the entry (e.g. path, linkpath). */
  pax?: Record<string, string>
  /** GNU long name ('L') or long link ('K') before the entry. */
  longName?: string
  longLink?: string
}

function block(name: string, type: string, size: number, link = '', prefix = ''): Buffer {
  const b = Buffer.alloc(BLOCK)
  b.write(name, 0, 'utf8')
  b.write('0000644\0', 100, 'latin1')
  b.write('0000000\0', 108, 'latin1')
  b.write('0000000\0', 116, 'latin1')
  b.write(`${size.toString(8).padStart(11, '0')}\0`, 124, 'latin1')
  b.write('14000000000\0', 136, 'latin1')
  b.write(type, 156, 'latin1')
  b.write(link, 157, 'utf8')
  b.write('ustar\x0000', 257, 'latin1')
  b.write(prefix, 345, 'utf8')
  let sum = 0
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : b[i]!
  b.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1')
  return b
}

function padded(data: Buffer): Buffer {
  return Buffer.concat([data, Buffer.alloc((BLOCK - (data.length % BLOCK)) % BLOCK)])
}

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`
  let len = Buffer.byteLength(body) + 1
  while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body)
  return `${len}${body}`
}

/** A whole tar (with its end-of-archive blocks) of these entries. */
export function tar(entries: TarEntry[]): Buffer {
  const parts: Buffer[] = []
  for (const e of entries) {
    if (e.pax !== undefined) {
      const records = Buffer.from(
        Object.entries(e.pax)
          .map(([k, v]) => paxRecord(k, v))
          .join('')
      )
      parts.push(block('PaxHeaders/x', 'x', records.length), padded(records))
    }
    for (const [type, value] of [
      ['L', e.longName],
      ['K', e.longLink]
    ] as const) {
      if (value === undefined) continue
      const data = Buffer.from(`${value}\0`)
      parts.push(block('././@LongLink', type, data.length), padded(data))
    }
    const content = Buffer.from(e.content ?? '')
    const type = e.type ?? '0'
    parts.push(block(e.name, type, type === '0' ? content.length : 0, e.link, e.prefix))
    if (type === '0') parts.push(padded(content))
  }
  parts.push(Buffer.alloc(2 * BLOCK))
  return Buffer.concat(parts)
}

export interface HostileTar {
  label: string
  tar: Buffer
  /** The name of the refused entry as the tar reader sees it (extensions applied). */
  name: string
  /** Its hardlink target, when that is what is refused. */
  link?: string
}

const file: TarEntry = { name: 'ok/file', content: 'fine\n' }
const long = 'x'.repeat(150)

/** Names that could escape the layer, and hardlinks to files outside it, each after a harmless entry. */
export const HOSTILE_TARS: HostileTar[] = (
  [
    ['a name with ../', { name: '../evil' }, '../evil'],
    ['a name with ../..', { name: '../../etc/passwd' }, '../../etc/passwd'],
    ['the name ..', { name: '..', type: '5' }, '..'],
    ['the name ../', { name: '../', type: '5' }, '../'],
    ['./.. in front', { name: './../evil' }, './../evil'],
    ['a/../../x', { name: 'a/../../x' }, 'a/../../x'],
    ['a/../x (.. inside, even when it stays in)', { name: 'a/../x' }, 'a/../x'],
    ['a/b/../../../x', { name: 'a/b/../../../x' }, 'a/b/../../../x'],
    ['a name ending in /..', { name: 'a/..', type: '5' }, 'a/..'],
    ['a directory ../d/', { name: '../d/', type: '5' }, '../d/'],
    ['an absolute name', { name: '/etc/passwd' }, '/etc/passwd'],
    ['the name /', { name: '/', type: '5' }, '/'],
    ['a name starting with //', { name: '//etc/cron.d/x' }, '//etc/cron.d/x'],
    ['an absolute name with ..', { name: '/a/../b' }, '/a/../b'],
    ['a symlink named out of the layer', { name: '../link', type: '2', link: 'ok/file' }, '../link'],
    ['a hardlink named out of the layer', { name: '../hl', type: '1', link: 'ok/file' }, '../hl'],
    ['a GNU long name with ..', { name: 'placeholder', longName: `../${long}` }, `../${long}`],
    ['a PAX path with ..', { name: 'placeholder', pax: { path: '../../etc/shadow' } }, '../../etc/shadow'],
    ['an absolute PAX path', { name: 'placeholder', pax: { path: '/etc/shadow' } }, '/etc/shadow'],
    ['a NUL in a PAX path', { name: 'placeholder', pax: { path: 'a\0b' } }, 'a\0b'],
    ['.. in the ustar prefix', { name: 'etc/passwd', prefix: '..' }, '../etc/passwd'],
    ['an absolute ustar prefix', { name: 'passwd', prefix: '/etc' }, '/etc/passwd'],
    ['an empty name', { name: '' }, '']
  ] as [string, TarEntry, string][]
)
  .map(([label, entry, name]): HostileTar => ({ label, tar: tar([file, entry]), name }))
  .concat(
    (
      [
        ['a hardlink to ../../etc/passwd', { name: 'hl', type: '1', link: '../../etc/passwd' }, '../../etc/passwd'],
        ['a hardlink to /etc/passwd', { name: 'hl', type: '1', link: '/etc/passwd' }, '/etc/passwd'],
        ['a hardlink to a/../../x', { name: 'hl', type: '1', link: 'ok/../../x' }, 'ok/../../x'],
        ['a hardlink to ..', { name: 'hl', type: '1', link: '..' }, '..'],
        [
          'a hardlink with a PAX linkpath out of the layer',
          { name: 'hl', type: '1', link: 'ok/file', pax: { linkpath: '../../etc/shadow' } },
          '../../etc/shadow'
        ],
        [
          'a hardlink with a GNU long link out of the layer',
          { name: 'hl', type: '1', longLink: `../../${long}` },
          `../../${long}`
        ],
        [
          'a hardlink with a NUL in its PAX linkpath',
          { name: 'hl', type: '1', pax: { linkpath: 'ok/file\0' } },
          'ok/file\0'
        ],
        ['a hardlink without a target', { name: 'hl', type: '1' }, '']
      ] as [string, TarEntry, string][]
    ).map(([label, entry, link]): HostileTar => ({ label, tar: tar([file, entry]), name: entry.name, link }))
  )

/** Names the TOC parser takes (and normalises): they must still build. Symlinks may point anywhere. */
export const BENIGN_TAR: Buffer = tar([
  { name: './', type: '5' },
  { name: './a', content: 'a\n' },
  { name: 'd/', type: '5' },
  { name: 'd/./b', content: 'b\n' },
  { name: 'd//c', content: 'c\n' },
  { name: '...', content: 'three dots\n' },
  { name: '..hidden', content: 'dots first\n' },
  { name: 'd/x..', content: 'dots last\n' },
  { name: './d/hl', type: '1', link: './d/./b' },
  { name: 'abs-symlink', type: '2', link: '/etc/passwd' },
  { name: 'up-symlink', type: '2', link: '../../etc/passwd' },
  { name: 'placeholder', pax: { path: './d/pax' }, content: 'pax\n' }
])

/** Each path of BENIGN_TAR as the TOC parser normalises it. */
export const BENIGN_PATHS = [
  'a',
  'd',
  'd/b',
  'd/c',
  '...',
  '..hidden',
  'd/x..',
  'd/hl',
  'abs-symlink',
  'up-symlink',
  'd/pax'
]

/** What strata's TOC parser says of a layer naming that entry: the text after `TOC entry #1 ("…"): `. */
export function tocParserReason(c: HostileTar): string {
  const entries: Record<string, unknown>[] = [{ name: 'ok/', type: 'dir' }]
  entries.push(
    c.link !== undefined ? { name: 'hl', type: 'hardlink', linkName: c.link } : { name: c.name, type: 'dir' }
  )
  try {
    parseTOC(new TextEncoder().encode(JSON.stringify({ version: 1, entries })), {
      format: 'estargz',
      tocOffset: 0,
      blobSize: 0
    })
  } catch (err) {
    if ((err as Error).name !== 'InvalidTOCError') throw err
    return (err as Error).message.replace(/^TOC entry #1 \(.*?\): /s, '')
  }
  throw new Error(`the TOC parser takes ${JSON.stringify(c.name)}`)
}

/** The builder's message for the refused entry (each hostile entry follows a 1024-byte harmless one). */
export function builderMessage(c: HostileTar): string {
  return `tar entry ${JSON.stringify(c.name.slice(0, 200))} at offset 1024: ${tocParserReason(c)}`
}
