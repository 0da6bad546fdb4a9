#!/usr/bin/env bash
# Throughput of `tokengate import` (docs/api.md, "Bulk import") against a local sandbox gateway:
# generates a file of Luhn-valid test card numbers (distinct, Visa range), starts
# `tokengate serve` (release build, sandbox mode, embedded store on a temporary directory, the
# in-process D1 simulator), creates a merchant, runs the import and prints lines/s.
#
#   bash scripts/import-bench.sh                      # 100,000 lines, --concurrency 32
#   LINES=20000 CONCURRENCY=16 bash scripts/import-bench.sh
#   KEEP_RATE_LIMITS=1 bash scripts/import-bench.sh   # with the gateway's per-key limit (500/s)
#   STORE=redis bash scripts/import-bench.sh          # a redis-server on a free port instead
#
# The gateway's per-key and per-merchant rate limits are switched off unless KEEP_RATE_LIMITS is
# set: the figure is what the importer and one gateway instance can do, not the default quota.
# Everything runs on 127.0.0.1 and stops by itself. Not part of CI (a release build takes
# minutes on 2 cores). Needs curl (and redis-server for STORE=redis).
set -euo pipefail
cd "$(dirname "$0")/.."

LINES=${LINES:-100000}
CONCURRENCY=${CONCURRENCY:-32}
ADMIN=bench-admin-token

command -v curl >/dev/null || { echo "import-bench: curl is required" >&2; exit 1; }

echo "== cargo build --release --bin tokengate" >&2
cargo build --release --bin tokengate >&2
bin=${CARGO_TARGET_DIR:-target}/release/tokengate

work=$(mktemp -d)
gw_pid=
redis_pid=
cleanup() {
  if [ -n "$gw_pid" ]; then kill "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; fi
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== generating $LINES lines" >&2
# 431 + 12 digits counting up + the Luhn check digit: distinct, Visa range.
awk -v n="$LINES" 'BEGIN {
  for (i = 1; i <= n; i++) {
    p = "431" sprintf("%012d", i); s = 0
    for (k = length(p); k >= 1; k--) {
      d = substr(p, k, 1) + 0
      if ((length(p) - k) % 2 == 0) { d *= 2; if (d > 9) d -= 9 }
      s += d
    }
    printf "{\"ref\":\"bench-%d\",\"number\":\"%s%d\",\"expiryMonth\":12,\"expiryYear\":2030,\"customerReference\":\"cust-%d\"}\n", i, p, (10 - s % 10) % 10, i
  }
}' > "$work/cards.jsonl"

port=$(( 20000 + RANDOM % 20000 ))
store=(--data-dir "$work/data")
if [ "${STORE:-embedded}" = redis ]; then
  rport=$(( port + 1 ))
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >/dev/null 2>&1 &
  redis_pid=$!
  store=(--redis-url "redis://127.0.0.1:$rport/")
  sleep 0.5
fi
limits=()
if [ -z "${KEEP_RATE_LIMITS:-}" ]; then
  limits=(TOKENGATE__RATE_LIMIT__PER_KEY_PER_S=0 TOKENGATE__RATE_LIMIT__PER_MERCHANT_PER_S=0)
fi
echo "== starting the gateway on 127.0.0.1:$port (store: ${STORE:-embedded})" >&2
env ${limits[@]+"${limits[@]}"} \
  TOKENGATE_ADMIN_TOKEN=$ADMIN TOKENGATE__LOG__LEVEL=warn TOKENGATE__LOG__ACCESS=false \
  TOKENGATE__SIM__CONTROL_LISTEN=127.0.0.1:0 \
  "$bin" serve --listen "127.0.0.1:$port" "${store[@]}" --sim-listen 127.0.0.1:0 \
  > "$work/gateway.log" 2>&1 &
gw_pid=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { echo "gateway did not start:" >&2; cat "$work/gateway.log" >&2; exit 1; }

key=$(curl -fs -X POST "http://127.0.0.1:$port/v1/merchants" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' -d '{"name":"Import bench"}' | sed -n 's/.*"apiKey":"\([^"]*\)".*/\1/p')
[ -n "$key" ] || { echo "cannot create the merchant" >&2; exit 1; }

echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other builds running skew the figure)" >&2
echo "== $bin import --api http://127.0.0.1:$port --file cards.jsonl --concurrency $CONCURRENCY --progress plain" >&2
start=$(date +%s.%N)
status=0
TOKENGATE_API_KEY=$key "$bin" import --api "http://127.0.0.1:$port" --file "$work/cards.jsonl" \
  --concurrency "$CONCURRENCY" --progress plain || status=$?
end=$(date +%s.%N)
mapped=$(wc -l < "$work/cards.tokens.jsonl")
awk -v n="$mapped" -v a="$start" -v b="$end" -v c="$CONCURRENCY" \
  'BEGIN { printf "import-bench: %d lines mapped in %.1f s: %.0f lines/s (concurrency %d)\n", n, b - a, n / (b - a), c }'
exit "$status"
