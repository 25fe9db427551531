// @strata/fs: FUSE: a merged read-only view of an image over the fetcher
export {}
