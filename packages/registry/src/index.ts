// @strata/registry: OCI distribution client: references, auth, manifests, Range reads, push
export {}
