// @strata/node: p2pd: libp2p host, DHT announce/find, chunk exchange, control API, metrics, warm-up
export {}
