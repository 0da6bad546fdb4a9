#!/usr/bin/env bash
# The chaos suite of docs/reliability.md in one command. Builds the debug binaries (`tokengate` and
# the harness `tokengate-loadtest`; no release build, so CI reuses what the tests built), then runs
# `tokengate-loadtest chaos`, which starts its own redis-server (AOF, appendfsync always), the D1
# simulator as its own process, gateways and a webhook receiver, on loopback only; injects the
# faults; prints the table (scenario, load, faults, acknowledged, lost, duplicated, notes); and
# exits non-zero when lost or duplicated is not zero. Every process it starts is killed when it
# ends. Bounded: a few minutes in full, under about two minutes with --short.
#
#   bash scripts/chaos.sh                       # every scenario, full length
#   bash scripts/chaos.sh --short               # the CI variant (scripts/test.sh runs it)
#   bash scripts/chaos.sh --only lcm-storm,d1-faults
#
# Needs: redis-server, redis-cli (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in redis-server redis-cli; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "chaos: $tool is required (apt-get install redis-server)" >&2
    exit 1
  fi
done

echo "== cargo build (debug) -p tokengate -p tokengate-loadtest" >&2
cargo build -p tokengate -p tokengate-loadtest >&2

# Bounded even if something inside hangs: the suite itself stops long before this.
limit=900
for a in "$@"; do
  if [ "$a" = "--short" ]; then limit=300; fi
done
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec timeout --kill-after=10 "$limit" target/debug/tokengate-loadtest chaos "$@"
