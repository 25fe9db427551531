import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const doc = join(fileURLToPath(new URL('../../../', import.meta.url)), 'docs', 'benchmarks.md')

/** Replaces the `## TITLE` section of docs/benchmarks.md with `lines` (appended when there is none). */
export async function writeDocSection(title: string, lines: string[]): Promise<void> {
  const text = await readFile(doc, 'utf8')
  const section = `## ${title}\n\n${lines.join('\n').trimEnd()}\n`
  const at = text.indexOf(`\n## ${title}\n`)
  if (at < 0) return writeFile(doc, `${text.trimEnd()}\n\n${section}`)
  const end = text.indexOf('\n## ', at + 1)
  await writeFile(doc, text.slice(0, at + 1) + section + (end < 0 ? '' : text.slice(end)))
}
