#!/usr/bin/env bash
# System install for the vectorgeo database stage: PostgreSQL 15, PostGIS 3 and pgvector >= 0.8.
#
# Idempotent: each step is skipped when its result is already present, and `apt-get update` runs only
# when a package must be fetched. pgvector comes from the distro when the distro has >= 0.8, else it
# is built from Debian trixie's source package (bookworm has no pgvector package).
# Run as root (or through sudo): bash setup/postgres.sh
set -euo pipefail

PG_MAJOR=15
PGVECTOR_MIN=0.8.0
PKGS=(postgresql-$PG_MAJOR postgresql-$PG_MAJOR-postgis-3 postgresql-server-dev-$PG_MAJOR)
SRC_LIST=/etc/apt/sources.list.d/vectorgeo-trixie-src.sources
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup/postgres] $*"; }

UPDATED=0
apt_update() {
  if [ "$UPDATED" -eq 0 ]; then
    $SUDO apt-get update -q
    UPDATED=1
  fi
}

# version_ge A B: true when version A >= version B
version_ge() { dpkg --compare-versions "$1" ge "$2"; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# --- PostgreSQL, PostGIS, server headers ------------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_update
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "postgresql-$PG_MAJOR, postgis and server headers already installed"
fi

# --- pgvector ------------------------------------------------------------------------------------------
sharedir=$("$PG_CONFIG" --sharedir)
pkglibdir=$("$PG_CONFIG" --pkglibdir)
control="$sharedir/extension/vector.control"
current=""
if [ -f "$control" ] && [ -f "$pkglibdir/vector.so" ]; then
  current=$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$control")
fi
if [ -n "$current" ] && version_ge "$current" "$PGVECTOR_MIN"; then
  log "pgvector $current already installed"
  exit 0
fi

candidate() {
  apt-cache policy "postgresql-$PG_MAJOR-pgvector" 2>/dev/null | sed -n 's/^ *Candidate: *//p'
}
cand=$(candidate)
if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
  apt_update
  cand=$(candidate)
fi
if [ -n "$cand" ] && [ "$cand" != "(none)" ] && version_ge "${cand#*:}" "$PGVECTOR_MIN"; then
  log "installing postgresql-$PG_MAJOR-pgvector $cand from the distro"
  $SUDO apt-get install -y -q --no-install-recommends "postgresql-$PG_MAJOR-pgvector"
  exit 0
fi

log "building pgvector from Debian trixie's source package (distro candidate: ${cand:-none})"
if [ ! -f "$SRC_LIST" ]; then
  $SUDO tee "$SRC_LIST" >/dev/null <<'EOF'
# added by vectorgeo setup/postgres.sh: source packages only (pgvector >= 0.8 for bookworm)
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  UPDATED=0
fi
apt_update
command -v dpkg-source >/dev/null || $SUDO apt-get install -y -q --no-install-recommends dpkg-dev
command -v make >/dev/null && command -v gcc >/dev/null \
  || $SUDO apt-get install -y -q --no-install-recommends make gcc

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
chmod 755 "$build"
(
  cd "$build"
  # apt's sandbox user must be able to write here
  chown _apt "$build" 2>/dev/null || true
  apt-get source --download-only pgvector/trixie
  dpkg-source -x ./*.dsc src >/dev/null
  cd src
  make -s PG_CONFIG="$PG_CONFIG" OPTFLAGS=""
  $SUDO make -s PG_CONFIG="$PG_CONFIG" install
)
version=$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$control")
if ! version_ge "$version" "$PGVECTOR_MIN"; then
  echo "[setup/postgres] pgvector $version installed, but >= $PGVECTOR_MIN is needed" >&2
  exit 1
fi
log "pgvector $version installed"
