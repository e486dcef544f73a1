#!/usr/bin/env bash
# One LMCache 0.5.6 server (`lmcache server`, multiprocess mode) whose L2 is kvctl's adapter:
# chunks are stored on disk as kvctl-cachegen blobs at their real size. Run one per serving
# node; vLLM connects to it as to any LMCache server. Several servers may share KV_DIR.
#
#   KV_DIR=/var/cache/lmcache-kv HEAD_DIM=128 examples/lmcache-server.sh
#
# HEAD_DIM: the model's head size (64 for SmolLM2-135M, 128 for Llama-3-8B). On a CPU-only
# machine LMCache needs --eviction-policy with --l1-size-gb, and --disable-observability
# unless `opentelemetry-sdk` is installed (LMCache's CPU install leaves it out). The server
# logs "kvctl ...: KvctlFSL2Adapter loaded" once the adapter is in use.
set -euo pipefail
KV_DIR=${KV_DIR:-/var/cache/lmcache-kv}
HEAD_DIM=${HEAD_DIM:-128}
SERDE=${SERDE:-kvctl-cachegen}
exec lmcache server --port "${PORT:-5555}" --http-port "${HTTP_PORT:-8080}" \
  --l1-size-gb "${L1_SIZE_GB:-4}" --eviction-policy LRU --disable-observability \
  --l2-adapter "{\"type\": \"plugin\",
    \"module_path\": \"kvctl.integrations.lmcache.plugin\", \"class_name\": \"KvctlFSL2Adapter\",
    \"adapter_params\": {\"base_path\": \"$KV_DIR\"},
    \"serde\": {\"type\": \"$SERDE\", \"head_dim\": $HEAD_DIM}}"
