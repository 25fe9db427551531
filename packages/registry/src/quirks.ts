/**
 * Every registry quirk this client works around, in one place, each with its reason.
 * The client calls these instead of spreading special cases through the request code.
 */

/** Docker Hub is named `docker.io` in references, but its API lives on another host. */
export function apiHost(registry: string): string {
  return registry === 'docker.io' ? 'registry-1.docker.io' : registry
}

/**
 * Loopback registries are plain HTTP by default: local and test registries rarely have TLS, and the traffic
 * never leaves the machine (docker treats 127.0.0.0/8 the same way).
 */
export function insecureByDefault(registry: string): boolean {
  const host = registry.replace(/:\d+$/, '').replace(/^\[|\]$/g, '')
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host)
}

/**
 * Keys under which `~/.docker/config.json` may hold a registry's credentials: `docker login` stores Docker Hub
 * under its v1 URL, and older tools stored other registries with a scheme.
 */
export function dockerConfigKeys(registry: string): string[] {
  if (registry === 'docker.io') return ['https://index.docker.io/v1/', 'index.docker.io', 'docker.io']
  return [registry, `https://${registry}`, `http://${registry}`, `https://${registry}/v1/`]
}

/** The server URL credential helpers expect: Docker Hub's is its v1 URL, others their host. */
export function credentialHelperServer(registry: string): string {
  return registry === 'docker.io' ? 'https://index.docker.io/v1/' : registry
}

/**
 * When following a redirect to another host (blob storage: S3, GCS, a CDN), drop the registry's Authorization:
 * signed URLs carry their own authorization, and S3 answers 400 when both are present; it would also leak the
 * registry token to a third party.
 */
export function keepAuthorization(from: URL, to: URL): boolean {
  return from.host === to.host && from.protocol === to.protocol
}

/**
 * A redirect target (a signed storage URL) that answers 401/403 has most likely expired: resolve the blob from
 * the registry again (once) instead of failing.
 */
export function storageUrlExpired(status: number): boolean {
  return status === 401 || status === 403
}

/**
 * Some registries and proxies ignore Range and answer 200 with the whole blob. The client then takes the slice it
 * asked for from the stream, and remembers the registry so that many ranges of one blob are served from a single
 * full read instead of one full read each.
 */
export function ignoredRange(status: number): boolean {
  return status === 200
}

/**
 * Token responses carry the token as `token` (Docker) or `access_token` (OAuth2 style, e.g. some cloud registries);
 * `expires_in` may be missing, in which case the spec says 60 seconds.
 */
export function tokenFromResponse(body: unknown): { token: string; expiresInMs: number } | undefined {
  if (typeof body !== 'object' || body === null) return undefined
  const b = body as { token?: unknown; access_token?: unknown; expires_in?: unknown }
  const token = typeof b.token === 'string' && b.token !== '' ? b.token : b.access_token
  if (typeof token !== 'string' || token === '') return undefined
  const seconds = typeof b.expires_in === 'number' && b.expires_in > 0 ? b.expires_in : 60
  return { token, expiresInMs: seconds * 1000 }
}

/**
 * The manifest's media type: registries add parameters (`; charset=utf-8`) to Content-Type, and some serve
 * `application/json` or `text/plain`; the document's own `mediaType` field wins over a generic header.
 */
export function manifestMediaType(contentType: string | null, body: unknown): string | undefined {
  const header = contentType?.split(';')[0]?.trim().toLowerCase()
  const field =
    typeof body === 'object' && body !== null && typeof (body as { mediaType?: unknown }).mediaType === 'string'
      ? (body as { mediaType: string }).mediaType
      : undefined
  if (field !== undefined) return field
  if (header !== undefined && header !== '' && header !== 'application/json' && header !== 'text/plain') return header
  // OCI manifests may omit mediaType: tell them apart by shape.
  if (typeof body === 'object' && body !== null) {
    if (Array.isArray((body as { manifests?: unknown }).manifests)) return 'application/vnd.oci.image.index.v1+json'
    if (Array.isArray((body as { layers?: unknown }).layers)) return 'application/vnd.oci.image.manifest.v1+json'
  }
  return header
}

/**
 * Upload `Location` headers may be relative (distribution) or absolute (others), and must keep any query
 * parameters (state tokens) they carry when the digest is appended.
 */
export function uploadUrl(location: string, base: URL): URL {
  return new URL(location, base)
}

/** A mount request the registry did not honour starts an ordinary upload (202) instead of 201. */
export function mountHonoured(status: number): boolean {
  return status === 201
}
