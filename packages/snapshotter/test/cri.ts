// A CRI client (runtime.v1, the part in cri.proto) over containerd's socket, as the kubelet drives it.
import { fileURLToPath } from 'node:url'
import { credentials, loadPackageDefinition, type ServiceError } from '@grpc/grpc-js'
import { loadSync } from '@grpc/proto-loader'

type Method = (req: object, cb: (err: ServiceError | null, res: unknown) => void) => void
type Client = Record<string, Method> & { close(): void }

export interface Cri {
  runtime<T = Record<string, unknown>>(method: string, req: object): Promise<T>
  image<T = Record<string, unknown>>(method: string, req: object): Promise<T>
  close(): void
}

export function criClient(socket: string): Cri {
  const def = loadSync(fileURLToPath(new URL('./cri.proto', import.meta.url)), {
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true
  })
  // biome-ignore lint/suspicious/noExplicitAny: generated from the .proto at run time
  const pkg = (loadPackageDefinition(def) as any).runtime.v1
  const address = `unix:${socket}`
  const runtime = new pkg.RuntimeService(address, credentials.createInsecure()) as Client
  const image = new pkg.ImageService(address, credentials.createInsecure()) as Client
  const call =
    (client: Client) =>
    <T>(method: string, req: object): Promise<T> =>
      new Promise((resolve, reject) =>
        client[method]!.call(client, req, (err, res) =>
          err !== null ? reject(new Error(`CRI ${method}: ${err.details || err.message}`)) : resolve(res as T)
        )
      )
  return {
    runtime: call(runtime),
    image: call(image),
    close() {
      runtime.close()
      image.close()
    }
  }
}

/** A pod sandbox on the host network (no CNI needed), logging into `logDirectory`. */
export function sandboxConfig(name: string, logDirectory: string): object {
  return {
    metadata: { name, uid: `${name}-uid`, namespace: 'strata-test', attempt: 0 },
    log_directory: logDirectory,
    linux: { security_context: { namespace_options: { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' } } }
  }
}
