// @strata/store: Content-addressed chunk store: memory and disk (files + level index), LRU cap, pins
export {}
