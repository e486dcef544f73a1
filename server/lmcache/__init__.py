"""LMCache 0.5.6 fleets under kvctl's controller: the wire schema, the three controller
sockets, the per-worker command transport and the chunk-hash directory."""
