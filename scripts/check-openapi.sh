#!/usr/bin/env bash
# The OpenAPI contract, checked by tools that know nothing of tokengate: the document printed by
# `tokengate openapi` (the one `GET /openapi.json` serves) must pass two independent OpenAPI 3.1
# validators (openapi-spec-validator from PyPI, Redocly CLI from npm), repeat no parameter, and
# come out of a mainstream client generator (openapi-python-client) with a typed function for
# every operation. tests/it/openapi.rs checks real responses against the same document; this
# catches what a generator or validator refuses and our own test reads past (issue 14).
#
# Usage: scripts/check-openapi.sh [DOCUMENT.json]   (default: build and print it with cargo)
# Tools are pinned and installed once under target/openapi-check (OPENAPI_CHECK_DIR overrides);
# a second run reuses them. Needs python3 (with venv/pip) and node/npm, and the registries only.
set -euo pipefail
# A document given as an argument is relative to the caller's directory, not the repository's.
doc="${1:-}"
if [ -n "$doc" ]; then doc="$(cd "$(dirname "$doc")" && pwd)/$(basename "$doc")"; fi
cd "$(dirname "$0")/.."

SPEC_VALIDATOR_VERSION=0.9.0
PY_CLIENT_VERSION=0.29.1
REDOCLY_VERSION=2.77.0

work="${OPENAPI_CHECK_DIR:-$PWD/target/openapi-check}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
failures=()

# --- tools (idempotent: a stamp names the versions installed) ------------------------------------
venv="$work/venv"
py_stamp="openapi-spec-validator==$SPEC_VALIDATOR_VERSION openapi-python-client==$PY_CLIENT_VERSION"
# The stamp records the venv's own path too: a venv's scripts hold absolute paths, so one that
# was moved (a copied target directory) is rebuilt rather than half-working.
py_stamp="$py_stamp @ $venv"
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$py_stamp" ]; then
  echo "== installing ${py_stamp% @ *} into $venv"
  rm -rf "$venv"
  # shellcheck disable=SC2086 # the stamp is the requirement list
  if python3 -m venv "$venv" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check ${py_stamp% @ *}
  else
    # Debian's python3 without python3-venv has no ensurepip: a bare venv, filled by the host's pip.
    rm -rf "$venv"
    python3 -m venv --without-pip "$venv"
    python3 -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check ${py_stamp% @ *}
  fi
  echo "$py_stamp" >"$venv/.stamp"
fi
npm_dir="$work/npm"
npm_stamp="@redocly/cli@$REDOCLY_VERSION"
if [ "$(cat "$npm_dir/.stamp" 2>/dev/null)" != "$npm_stamp" ]; then
  echo "== installing $npm_stamp into $npm_dir"
  rm -rf "$npm_dir"
  mkdir -p "$npm_dir"
  npm install --prefix "$npm_dir" --no-audit --no-fund --silent --save-exact "$npm_stamp"
  echo "$npm_stamp" >"$npm_dir/.stamp"
fi

# --- the document ------------------------------------------------------------------------------
if [ -z "$doc" ]; then
  doc="$work/openapi.json"
  echo "== tokengate openapi > $doc"
  # Built with the whole workspace selected, as `cargo test --workspace` builds it: the same
  # feature set, so after the test step nothing is compiled again (a `cargo run` of the one
  # package would rebuild the crates whose features differ).
  bin="${CARGO_TARGET_DIR:-target}/debug/tokengate"
  if ! cargo build --quiet --workspace --bins || ! "$bin" openapi >"$doc"; then
    echo "openapi contract: FAILED (could not build or print the document)"
    exit 1
  fi
fi
ops="$("$venv/bin/python" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(1 for i in d["paths"].values() for m in i if m in ("get","put","post","delete","patch","head","options","trace")))' "$doc")"

# --- Redocly: a second, unrelated validator ---------------------------------------------------
# `spec` is Redocly's OpenAPI-structure rule set; the named rules add what generators need
# (operationIds, parameters, path templates) without the style opinions of `recommended`.
echo "== redocly lint ($REDOCLY_VERSION)"
cat >"$work/redocly.yaml" <<'EOF'
extends:
  - spec
rules:
  operation-operationId: error
  operation-operationId-unique: error
  operation-operationId-url-safe: error
  operation-parameters-unique: error
  path-parameters-defined: error
  path-declaration-must-exist: error
  path-not-include-query: error
  no-identical-paths: error
  no-ambiguous-paths: error
  operation-2xx-response: error
  no-unresolved-refs: error
  no-enum-type-mismatch: error
  no-invalid-schema-examples: error
  no-invalid-parameter-examples: error
EOF
set +e
redocly_out="$(REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true \
  "$npm_dir/node_modules/.bin/redocly" lint --config "$work/redocly.yaml" --format stylish "$doc" 2>&1)"
redocly_rc=$?
set -e
# Its Node.js end-of-life banner is noise here; everything else is shown.
grep -v -e '^[[:space:]]*$' -e '[║╔╚]' <<<"$redocly_out" || true
if [ "$redocly_rc" -ne 0 ]; then failures+=("redocly lint"); fi

# --- openapi-spec-validator, our parameter rules, the generated client -----------------------
echo "== openapi-spec-validator, parameters, operationIds, openapi-python-client"
if ! "$venv/bin/python" scripts/check_openapi.py "$doc" "$work"; then
  failures+=("python checks")
fi

if [ "${#failures[@]}" -eq 0 ]; then
  echo "openapi contract: OK: $ops operations; openapi-spec-validator $SPEC_VALIDATOR_VERSION, redocly $REDOCLY_VERSION, openapi-python-client $PY_CLIENT_VERSION"
else
  echo "openapi contract: FAILED ($(IFS=,; echo "${failures[*]}")): $doc"
  exit 1
fi
