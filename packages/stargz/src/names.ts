/**
 * The rule for the names of a layer's entries and the targets of its hardlinks, shared by the TOC parser (which
 * refuses a layer that breaks it) and the builder (which refuses to make one): not empty, no NUL byte, not
 * absolute, no `..` part. `./a`, `a/./b`, `a//b` and a trailing `/` are fine, and normalised away. Symlink
 * targets are not names: they may be absolute, as they are in real images.
 */

/** Why a name breaks the rule: the text both the TOC parser and the builder put after what they name. */
export interface RefusedName {
  refused: string
}

/** A name part that is empty, `.` or `..` (after stripping one leading `./` and one trailing `/`). */
const ODD_NAME = /(^|\/)\.{0,2}(\/|$)/

/**
 * The name normalised (no `./`, no empty or `.` parts, no leading or trailing `/`; the root is ''), or why it
 * is refused. `what` is what the reason calls it: `name` or `hardlink target`.
 */
export function normaliseEntryName(name: string, what = 'name'): string | RefusedName {
  if (name === '') return { refused: `empty ${what}` }
  if (name.includes('\0')) return { refused: `${what} contains a NUL byte` }
  if (name.startsWith('/')) return { refused: `absolute ${what} ${JSON.stringify(name)} is refused` }
  // Fast path for the usual `./dir/file` and `dir/`: no empty, `.` or `..` parts once those are stripped.
  const stripped = name.slice(name.startsWith('./') ? 2 : 0, name.endsWith('/') ? -1 : undefined)
  if (!ODD_NAME.test(stripped)) return stripped
  const parts = name.split('/').filter((p) => p !== '' && p !== '.')
  if (parts.includes('..')) {
    return { refused: `${what} ${JSON.stringify(name)} contains '..' and could escape the layer` }
  }
  return parts.join('/')
}
