// @strata/fetcher: The read path: store -> peers -> registry; verify; single-flight; prefetch
export {}
