import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdir, readdir, readFile, rename, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { repoRoot } from '../helpers/tools.js'
import { run } from './proc.js'

/**
 * The workloads, hello-bench style: an image and a command whose completion means the container is ready.
 * Root file systems are built here without the internet (debootstrap from Debian's mirror, or this machine's
 * own programs) and cached, with their OCI layouts and conversions, under the cache directory.
 */
export interface Workload {
  name: string
  /** What the image is, for the report. */
  description: string
  /** Run inside the image with chroot. */
  argv: string[]
  /** The command as the report shows it. */
  shown: string
  /** Given on standard input. */
  stdin?: string
  /** What the command must print (trimmed) for the run to count. */
  stdout: string
  /** Makes the root file system in `dir` (which does not exist yet). */
  make(dir: string, options: { signal: AbortSignal }): Promise<void>
}

const MIRROR = 'http://deb.debian.org/debian'
const hostRootfs = join(repoRoot, 'scripts', 'lib', 'host-rootfs.sh')
const makeImage = join(repoRoot, 'scripts', 'lib', 'make-image.sh')

function debootstrap(include: string) {
  return async (dir: string, { signal }: { signal: AbortSignal }) => {
    await run('debootstrap', ['--variant=minbase', `--include=${include}`, 'bookworm', dir, MIRROR], {
      timeout: 60 * 60_000,
      signal
    })
  }
}

export const WORKLOADS: Record<string, Workload> = {
  python3: {
    name: 'python3',
    description: 'Debian bookworm minbase + python3 (debootstrap)',
    argv: ['python3', '-c', 'print(1)'],
    shown: "python3 -c 'print(1)'",
    stdout: '1',
    make: debootstrap('python3')
  },
  gcc: {
    name: 'gcc',
    description: 'Debian bookworm minbase + gcc, libc6-dev (debootstrap)',
    argv: ['sh', '-c', 'gcc -x c -o /tmp/hello - && /tmp/hello'],
    shown: 'gcc -x c -o /tmp/hello - < hello.c && /tmp/hello',
    stdin: '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n',
    stdout: 'hello',
    make: debootstrap('gcc,libc6-dev')
  },
  node: {
    name: 'node',
    description: "this machine's /usr/local/bin/node and its libraries (host-rootfs.sh)",
    argv: ['/usr/local/bin/node', '-e', '0'],
    shown: 'node -e 0',
    stdout: '',
    async make(dir, { signal }) {
      await run('bash', [hostRootfs, dir, '/usr/local/bin/node', 'sh'], { signal })
    }
  },
  host: {
    name: 'host',
    description: "this machine's python3 with its standard library (host-rootfs.sh)",
    argv: ['python3', '-c', 'print(1)'],
    shown: "python3 -c 'print(1)'",
    stdout: '1',
    async make(dir, { signal }) {
      await run('bash', [hostRootfs, dir, '/usr/bin/python3', 'sh'], { signal })
      await mkdir(join(dir, 'usr', 'lib'), { recursive: true })
      await run('cp', ['-a', '/usr/lib/python3.11', join(dir, 'usr', 'lib')], { signal })
    }
  }
}

/** An OCI image layout on disk with its manifest's layers. */
export interface Layout {
  dir: string
  tag: string
  /** Sum of the layer blobs' sizes. */
  bytes: number
}

async function layout(dir: string, tag: string): Promise<Layout> {
  const index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8')) as {
    manifests: Array<{ digest: string }>
  }
  const manifestDigest = index.manifests[0]!.digest.replace('sha256:', '')
  const manifest = JSON.parse(await readFile(join(dir, 'blobs', 'sha256', manifestDigest), 'utf8')) as {
    layers: Array<{ size: number }>
  }
  return { dir, tag, bytes: manifest.layers.reduce((n, l) => n + l.size, 0) }
}

/** Runs `make` into `dir` unless it is there; builds under a temporary name so a failed build leaves nothing. */
async function cached(dir: string, make: (tmp: string) => Promise<void>): Promise<void> {
  if (existsSync(dir)) return
  const tmp = `${dir}.partial`
  await rm(tmp, { recursive: true, force: true })
  await make(tmp)
  await rename(tmp, dir)
}

async function duBytes(dir: string): Promise<number> {
  const { stdout } = await run('du', ['-sb', dir])
  return Number(stdout.split('\t')[0])
}

/** What the converter is: a conversion is reused only while the stargz builder's code is the same. */
async function builderId(): Promise<string> {
  const dist = join(repoRoot, 'packages', 'stargz', 'dist')
  const hash = createHash('sha256')
  for (const f of (await readdir(dist)).filter((n) => n.endsWith('.js')).sort()) {
    hash.update(f).update(await readFile(join(dist, f)))
  }
  return hash.digest('hex').slice(0, 16)
}

export interface PreparedImage {
  workload: Workload
  /** Bytes of the root file system. */
  rootfsBytes: number
  /** The plain image: one gzip layer (make-image.sh). */
  plain: Layout
}

/**
 * The root file system and plain OCI layout of a workload, made when missing. (Delete the cache directory's
 * `oci/NAME` after changing a root file system by hand.)
 */
export async function prepareImage(
  workload: Workload,
  cacheDir: string,
  options: { signal: AbortSignal; log: (line: string) => void }
): Promise<PreparedImage> {
  const rootfs = join(cacheDir, workload.name)
  if (!existsSync(rootfs)) options.log(`making the ${workload.name} root file system in ${rootfs}`)
  await cached(rootfs, (tmp) => workload.make(tmp, { signal: options.signal }))
  const plainDir = join(cacheDir, 'oci', workload.name, 'plain')
  await cached(plainDir, async (tmp) => {
    await run('bash', [makeImage, rootfs, tmp, 'latest'], { signal: options.signal })
  })
  return { workload, rootfsBytes: await duBytes(rootfs), plain: await layout(plainDir, 'latest') }
}

/**
 * `p2pctl convert oci:PLAIN oci:ESGZ [--prioritized-file LIST]`, cached by the plain image, the list and the
 * builder. Returns the eStargz layout and how long the conversion took (0 when cached).
 */
export async function convert(
  image: PreparedImage,
  cacheDir: string,
  prioritized: string | undefined,
  options: { signal: AbortSignal; log: (line: string) => void }
): Promise<{ layout: Layout; ms: number }> {
  const key = createHash('sha256')
    .update(await readFile(join(image.plain.dir, 'index.json')))
    .update(prioritized !== undefined ? await readFile(prioritized) : '')
    .update(await builderId())
    .digest('hex')
    .slice(0, 16)
  const dir = join(cacheDir, 'oci', image.workload.name, `esgz-${key}`)
  let ms = 0
  await cached(dir, async (tmp) => {
    options.log(`converting ${image.workload.name}${prioritized !== undefined ? ' with its recorded profile' : ''}`)
    const start = performance.now()
    await run(
      process.execPath,
      [
        join(repoRoot, 'packages', 'cli', 'bin', 'p2pctl.js'),
        'convert',
        `oci:${image.plain.dir}:latest`,
        `oci:${tmp}:latest`,
        ...(prioritized !== undefined ? ['--prioritized-file', prioritized] : [])
      ],
      { signal: options.signal, timeout: 60 * 60_000 }
    )
    ms = performance.now() - start
  })
  return { layout: await layout(dir, 'latest'), ms }
}
