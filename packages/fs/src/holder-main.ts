// The holder process (holder.ts): `node holder-main.js DIR`, started detached by p2pd (see held.ts).
import { runHolder } from './holder.js'

const dir = process.argv[2]
if (dir === undefined) {
  process.stderr.write('usage: holder-main.js DIR\n')
  process.exit(2)
}
await runHolder(dir)
