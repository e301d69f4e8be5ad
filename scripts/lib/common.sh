# Shared shell helpers for scripts/*: locate the repo, make the virtualenv, install system packages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${EVA_WS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# ensure_venv EXTRAS: create .venv with Python >= 3.11 and install the package (editable).
ensure_venv() {
  local extras="${1:-}"
  if [ ! -x "$PY" ]; then
    local python
    python="$(command -v python3.11 || command -v python3)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "Python 3.11 or newer is required (found $("$python" --version))" >&2; exit 1; }
    log "creating virtualenv in $VENV"
    "$python" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed${extras:+-$extras}"
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
    log "installing eva-ws${extras:+[$extras]}"
    # Quiet on success; the whole pip output on failure.
    if ! { "$PY" -m pip install --quiet --upgrade pip \
           && "$PY" -m pip install --quiet -e "$ROOT${extras:+[$extras]}"; } >"$VENV/pip.log" 2>&1; then
      cat "$VENV/pip.log" >&2
      echo "installing eva-ws failed (log above)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}

# ensure_apt COMMAND PACKAGE: install a Debian package when its command is missing.
ensure_apt() {
  local cmd="$1" pkg="$2"
  command -v "$cmd" >/dev/null 2>&1 && return 0
  log "installing $pkg (for $cmd)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  if [ ! -f /tmp/.eva-ws-apt-updated ]; then
    $SUDO apt-get update -qq && touch /tmp/.eva-ws-apt-updated
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$pkg" >/dev/null
}
