#!/usr/bin/env bash
# What storage.redis_durability costs a new card (docs/performance.md, "Durable acknowledgement"):
# none / wait (1 replica) / waitaof on the primary's AOF, alternated over rounds, on the release
# build with a fresh primary + replica for every run. Needs wrk, and the server of
# scripts/waitaof-server.sh (run it once) and `cargo build --release -p tokengate` first.
# Ports 7701, 7702 and 18975 on loopback.
set -u
cd "$(dirname "$0")/.."
BIN=target/release/tokengate
SRV="$(bash scripts/waitaof-server.sh)"
run() {
  mode=$1; shift
  d=$(mktemp -d); mkdir -p $d/p $d/r
  $SRV --port 7701 --dir $d/p --appendonly yes --save "" --daemonize yes --logfile $d/p/log
  $SRV --port 7702 --dir $d/r --appendonly yes --save "" --replicaof 127.0.0.1 7701 --daemonize yes --logfile $d/r/log
  until redis-cli -p 7702 info replication 2>/dev/null | grep -q "link_status:up"; do sleep 0.05; done
  sleep 1
  env TOKENGATE__STORAGE__REDIS_URL=redis://127.0.0.1:7701 TOKENGATE__SERVER__LISTEN=127.0.0.1:18975 \
    TOKENGATE__RATE_LIMIT__PER_KEY_PER_S=10000000 TOKENGATE__RATE_LIMIT__PER_KEY_BURST=10000000 \
    TOKENGATE__RATE_LIMIT__PER_MERCHANT_PER_S=10000000 TOKENGATE__RATE_LIMIT__PER_MERCHANT_BURST=10000000 \
    "$@" $BIN serve > $d/gw.out 2>&1 &
  gw=$!
  for i in $(seq 100); do curl -sf localhost:18975/readyz >/dev/null && break; sleep 0.1; done
  key=$(curl -s localhost:18975/v1/merchants -H "Authorization: Bearer sandbox-admin-token" -H 'Content-Type: application/json' -d '{"name":"Dur"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["apiKey"])')
  out=$(TG_API_KEY=$key wrk -t2 -c8 -d8s --latency -s loadtest/tokenize_new.lua http://127.0.0.1:18975 2>&1)
  rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  p50=$(echo "$out" | awk '$1=="50%"{print $2}'); p99=$(echo "$out" | awk '$1=="99%"{print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/{print $NF}')
  echo "$mode rps=$rps p50=$p50 p99=$p99 non2xx=${non2xx:-0} load=$(cut -d' ' -f1 /proc/loadavg)"
  kill $gw; wait $gw 2>/dev/null
  redis-cli -p 7702 shutdown nosave >/dev/null 2>&1; redis-cli -p 7701 shutdown nosave >/dev/null 2>&1
  rm -rf $d
}
for round in 1 2 3; do
  run none
  run wait TOKENGATE__STORAGE__REDIS_DURABILITY=wait TOKENGATE__STORAGE__REDIS_DURABILITY_REPLICAS=1
  run waitaof-local TOKENGATE__STORAGE__REDIS_DURABILITY=waitaof TOKENGATE__STORAGE__REDIS_DURABILITY_REPLICAS=0 TOKENGATE__STORAGE__REDIS_DURABILITY_LOCAL=1
done
