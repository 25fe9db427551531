// OCI descriptor annotations strata reads and writes, with the names the eStargz reference uses.

/** On a layer descriptor: sha256 of the layer's TOC JSON as stored; what vouches for a lazily read TOC. */
export const TOC_DIGEST_ANNOTATION = 'containerd.io/snapshot/stargz/toc.digest'

/** On a layer descriptor: the size of the uncompressed tar stream. */
export const UNCOMPRESSED_SIZE_ANNOTATION = 'io.containers.estargz.uncompressed-size'
