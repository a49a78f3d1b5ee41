#!/usr/bin/env bash
# Installs the viewer's browser assets (MapLibre GL JS, pinned in package.json / package-lock.json) from the
# npm registry into node_modules/, where `vectorgeo serve` finds them (no CDN: the viewer works offline).
#
# Idempotent: skipped when the pinned version is already installed.
# Run from anywhere: bash setup/npm.sh
set -euo pipefail

cd "$(dirname "$0")/.."
log() { echo "[setup/npm] $*"; }

want=$(node -p "require('./package.json').dependencies['maplibre-gl']")
have=""
if [ -f node_modules/maplibre-gl/package.json ]; then
  have=$(node -p "require('./node_modules/maplibre-gl/package.json').version")
fi
if [ "$have" = "$want" ] && [ -f node_modules/maplibre-gl/dist/maplibre-gl.mjs ]; then
  log "maplibre-gl $have already installed"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  log "installing nodejs + npm (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends nodejs npm
fi

log "installing maplibre-gl $want"
if [ -f package-lock.json ]; then
  npm ci --omit=dev --ignore-scripts --no-audit --no-fund
else
  npm install --omit=dev --ignore-scripts --no-audit --no-fund
fi
test -f node_modules/maplibre-gl/dist/maplibre-gl.mjs
log "done: $(node -p "require('./node_modules/maplibre-gl/package.json').version")"
