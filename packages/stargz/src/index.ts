// @strata/stargz: eStargz / stargz / zstd:chunked format: footer, TOC, chunk inflate + verify, builder
export {}
