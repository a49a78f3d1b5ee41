#!/usr/bin/env bash
# System install for the viewer's browser tests: Debian's Chromium (driven by the pinned PyPI playwright
# through executable_path=/usr/bin/chromium; `playwright install` is never used).
#
# Idempotent: nothing is fetched when chromium is already installed, and `apt-get update` runs only when
# a package must be fetched. Run as root (or through sudo): bash setup/browser.sh
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
log() { echo "[setup/browser] $*"; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

PKGS=(chromium fonts-liberation)
missing=()
for p in "${PKGS[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "chromium already installed: $(dpkg-query -W -f='${Version}' chromium)"
  exit 0
fi

log "installing ${missing[*]}"
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
test -x /usr/bin/chromium
log "done: $(dpkg-query -W -f='${Version}' chromium)"
