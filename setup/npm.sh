#!/usr/bin/env bash
# Installs the viewer's browser assets (MapLibre GL JS, and Swagger UI for /docs; pinned in package.json /
# package-lock.json) from the npm registry into node_modules/, where `vectorgeo serve` finds them (no CDN:
# the viewer and the API docs work offline).
#
# Idempotent: skipped when the pinned versions are already installed.
# Run from anywhere: bash setup/npm.sh
set -euo pipefail

cd "$(dirname "$0")/.."
log() { echo "[setup/npm] $*"; }

# every dependency of package.json installed at its pinned version?
up_to_date() {
  node -e '
    const fs = require("fs");
    const deps = require("./package.json").dependencies;
    for (const [name, want] of Object.entries(deps)) {
      const f = `node_modules/${name}/package.json`;
      if (!fs.existsSync(f) || JSON.parse(fs.readFileSync(f)).version !== want) process.exit(1);
    }' 2>/dev/null
}
if command -v node >/dev/null 2>&1 && up_to_date && [ -f node_modules/maplibre-gl/dist/maplibre-gl.mjs ]; then
  log "maplibre-gl and swagger-ui-dist already installed at their pinned versions"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  log "installing nodejs + npm (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  if ! $SUDO apt-get install -y -q --no-install-recommends nodejs npm; then
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends nodejs npm
  fi
fi

log "installing the npm packages pinned in package.json"
if [ -f package-lock.json ]; then
  npm ci --omit=dev --ignore-scripts --no-audit --no-fund
else
  npm install --omit=dev --ignore-scripts --no-audit --no-fund
fi
test -f node_modules/maplibre-gl/dist/maplibre-gl.mjs
test -f node_modules/swagger-ui-dist/swagger-ui-bundle.js
up_to_date
log "done"
