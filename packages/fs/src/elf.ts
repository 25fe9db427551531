/**
 * What a dynamically linked ELF program makes the loader open next: its interpreter and the libraries its
 * dynamic section names. A lazy mount reads each of those on demand, one round trip after another, while the
 * loader walks the list; knowing the list when the program is first read lets the mount fetch them all at
 * once. Only 64-bit little-endian ELF (x86-64, aarch64, riscv64...) is read; anything else, and any file that
 * is not what its header says, gives `undefined`: this is a hint, never an error.
 */
export interface ElfDependencies {
  /** PT_INTERP: the dynamic loader, an absolute path. */
  interpreter?: string
  /** DT_NEEDED sonames, in order. */
  needed: string[]
  /** DT_RUNPATH, else DT_RPATH: colon-separated directories, `$ORIGIN` not expanded. */
  runpath?: string
  /** e_machine (62 x86-64, 183 aarch64, ...). */
  machine: number
}

/** Reads `length` bytes at `offset` of the file (fewer at its end). */
export type ReadRange = (offset: number, length: number) => Promise<Uint8Array>

const PT_LOAD = 1
const PT_DYNAMIC = 2
const PT_INTERP = 3
const DT_NEEDED = 1n
const DT_STRTAB = 5n
const DT_STRSZ = 10n
const DT_RPATH = 15n
const DT_RUNPATH = 29n
/** Bounds on what a hostile or broken header can make us read. */
const MAX_PHDRS = 128
const MAX_DYNAMIC = 64 * 1024
const MAX_STRTAB = 1024 * 1024
const MAX_PATH = 4096

interface Segment {
  type: number
  offset: number
  vaddr: number
  filesz: number
}

export async function readElfDependencies(read: ReadRange, fileSize: number): Promise<ElfDependencies | undefined> {
  if (fileSize < 64) return undefined
  const header = view(await read(0, 64))
  if (header.byteLength < 64 || header.getUint32(0) !== 0x7f454c46) return undefined
  // EI_CLASS 2 (64-bit), EI_DATA 1 (little-endian); e_type ET_EXEC or ET_DYN.
  if (header.getUint8(4) !== 2 || header.getUint8(5) !== 1) return undefined
  const type = header.getUint16(16, true)
  if (type !== 2 && type !== 3) return undefined
  const machine = header.getUint16(18, true)
  const phoff = safeNumber(header.getBigUint64(32, true))
  const phentsize = header.getUint16(54, true)
  const phnum = header.getUint16(56, true)
  if (phoff === undefined || phentsize < 56 || phnum === 0 || phnum > MAX_PHDRS) return undefined
  if (phoff + phentsize * phnum > fileSize) return undefined

  const table = view(await read(phoff, phentsize * phnum))
  if (table.byteLength < phentsize * phnum) return undefined
  const segments: Segment[] = []
  for (let i = 0; i < phnum; i++) {
    const at = i * phentsize
    const offset = safeNumber(table.getBigUint64(at + 8, true))
    const vaddr = safeNumber(table.getBigUint64(at + 16, true))
    const filesz = safeNumber(table.getBigUint64(at + 32, true))
    if (offset === undefined || vaddr === undefined || filesz === undefined) return undefined
    if (offset + filesz > fileSize) return undefined
    segments.push({ type: table.getUint32(at, true), offset, vaddr, filesz })
  }

  const result: ElfDependencies = { needed: [], machine }
  const interp = segments.find((s) => s.type === PT_INTERP)
  if (interp !== undefined && interp.filesz > 1 && interp.filesz <= MAX_PATH) {
    const name = cString(await read(interp.offset, interp.filesz), 0)
    if (name?.startsWith('/')) result.interpreter = name
  }

  const dynamic = segments.find((s) => s.type === PT_DYNAMIC)
  if (dynamic === undefined) return result
  const entries = view(await read(dynamic.offset, Math.min(dynamic.filesz, MAX_DYNAMIC)))
  const needed: bigint[] = []
  let strtab: bigint | undefined
  let strsz: bigint | undefined
  let rpath: bigint | undefined
  let runpath: bigint | undefined
  for (let at = 0; at + 16 <= entries.byteLength; at += 16) {
    const tag = entries.getBigInt64(at, true)
    const value = entries.getBigUint64(at + 8, true)
    if (tag === 0n) break
    if (tag === DT_NEEDED) needed.push(value)
    else if (tag === DT_STRTAB) strtab = value
    else if (tag === DT_STRSZ) strsz = value
    else if (tag === DT_RPATH) rpath = value
    else if (tag === DT_RUNPATH) runpath = value
  }
  if (strtab === undefined || strsz === undefined) return result
  // DT_STRTAB is an address: the PT_LOAD segment that maps it gives its place in the file.
  const address = safeNumber(strtab)
  const size = safeNumber(strsz)
  if (address === undefined || size === undefined) return result
  const load = segments.find((s) => s.type === PT_LOAD && s.vaddr <= address && address < s.vaddr + s.filesz)
  if (load === undefined) return result
  const offset = load.offset + (address - load.vaddr)
  const strings = await read(offset, Math.min(size, MAX_STRTAB, load.offset + load.filesz - offset))
  const at = (i: bigint) => (i < BigInt(strings.byteLength) ? cString(strings, Number(i)) : undefined)
  for (const i of needed) {
    const name = at(i)
    if (name !== undefined && name !== '') result.needed.push(name)
  }
  const pathIndex = runpath ?? rpath
  const path = pathIndex !== undefined ? at(pathIndex) : undefined
  if (path !== undefined && path !== '') result.runpath = path
  return result
}

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
}

function safeNumber(value: bigint): number | undefined {
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : undefined
}

/** The NUL-terminated string at `start`; undefined without a NUL within MAX_PATH bytes. */
function cString(bytes: Uint8Array, start: number): string | undefined {
  const end = bytes.indexOf(0, start)
  if (end < 0 || end - start > MAX_PATH) return undefined
  return new TextDecoder().decode(bytes.subarray(start, end))
}
