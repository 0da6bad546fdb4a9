#!/usr/bin/env bash
# The load test of docs/performance.md in one command. Builds the release binary, raises the
# descriptor limit (10,000 idle connections need as many descriptors on each side), then runs
# `tokengate-loadtest loadtest`, which starts its own redis-server(s) on free ports, the bare hyper
# ceiling and the gateway, drives them with wrk and its open-loop generator, and prints the
# Markdown report (also written under target/loadtest/).
#
#   bash scripts/loadtest.sh                 # the scenario table against standalone Redis
#   bash scripts/loadtest.sh --cluster       # ... and against a three-primary Redis Cluster too
#   bash scripts/loadtest.sh --scale         # vault-size step: 10,000 then 1,000,000 tokens
#   bash scripts/loadtest.sh --quick         # a short smoke run (2 s per step, 500 connections)
#   bash scripts/loadtest.sh --io-floor --duration 5s --open-loop-share 0
#                                            # the I/O floor: bare hyper with a new card's Redis round
#                                            # trips and HTTP/2 call per request but none of its work
#   bash scripts/loadtest.sh --d1-latency --duration 30s   # D1 at 150 ms a call (simulator in its own
#                                            # process): open-loop new cards at 2,000/s, cryptograms at 3,000/s;
#                                            # other rates with --d1-new-rates 1000,1500 --d1-cryptogram-rates 0
#
# Other flags go to `tokengate-loadtest loadtest` (see `target/release/tokengate-loadtest loadtest --help`), e.g.
# `--duration 20s`, `--scenarios get,tokenize-new`, `--scale-sizes 10000,300000`.
# Needs: wrk, redis-server, redis-cli (apt-get install wrk redis-server). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in wrk redis-server redis-cli; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "loadtest: $tool is required (apt-get install wrk redis-server)" >&2
    exit 1
  fi
done

args=()
for a in "$@"; do
  case "$a" in
    --quick) args+=(--duration 2s --repeats 1 --idle-connections 500 --setup-tokens 200 --startups 1) ;;
    *) args+=("$a") ;;
  esac
done

echo "== cargo build --release" >&2
cargo build --release -p tokengate -p tokengate-loadtest >&2

# 10,000 connections: the gateway and the generator each hold one descriptor per connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 10500 ]; then
  echo "loadtest: descriptor limit is $(ulimit -n); the idle-connection step will open fewer than 10,000" >&2
fi

echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other builds running skew the figures)" >&2
exec target/release/tokengate-loadtest loadtest ${args[@]+"${args[@]}"}
