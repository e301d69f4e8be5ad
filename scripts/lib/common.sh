# Shared shell helpers for scripts/*: locate the repo, make the virtualenv, install system packages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${EVA_WS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# ensure_venv [test]: create .venv with Python >= 3.11, install the locked dependencies
# (requirements/runtime.txt, or requirements/test.txt for the test extra) with their hashes
# checked, then the package itself, editable, without dependencies. Nothing is installed while
# the lock and setup.cfg are those of the last install. scripts/lock refreshes the locks.
ensure_venv() {
  local extras="${1:-}"
  local lock="$ROOT/requirements/${extras:-runtime}.txt"
  [ -f "$lock" ] || { echo "no lock file $lock" >&2; exit 1; }
  if [ ! -x "$PY" ]; then
    local python
    python="$(command -v python3.11 || command -v python3)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "Python 3.11 or newer is required (found $("$python" --version))" >&2; exit 1; }
    log "creating virtualenv in $VENV"
    "$python" -m venv "$VENV"
  fi
  # The stamp holds a digest of what the install was made from; any change to it reinstalls.
  local stamp="$VENV/.installed${extras:+-$extras}" made_from
  made_from="$(cat "$lock" "$ROOT/setup.cfg" | sha256sum)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$made_from" ]; then
    log "installing eva-ws${extras:+[$extras]} from ${lock#"$ROOT/"}"
    # Quiet on success; the whole pip output on failure.
    if ! { "$PY" -m pip install --quiet --upgrade pip \
           && "$PY" -m pip install --quiet --require-hashes -r "$lock" \
           && "$PY" -m pip install --quiet --no-deps -e "$ROOT"; } >"$VENV/pip.log" 2>&1; then
      cat "$VENV/pip.log" >&2
      echo "installing eva-ws failed (log above)" >&2
      exit 1
    fi
    printf '%s\n' "$made_from" > "$stamp"
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
