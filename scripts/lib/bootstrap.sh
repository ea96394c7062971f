# Shared by scripts/up and scripts/test: install what Kernex needs on a fresh Debian machine.
# Idempotent: every step checks before it installs, so repeated runs cost seconds.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_debs PACKAGE... : apt-get install whichever of the packages is missing.
ensure_debs() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "kernex: installing ${missing[*]} (apt-get)" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# ensure_venv EXTRAS : a .venv with Kernex installed editable with the extras; reinstalled when
# pyproject.toml changes (its hash is kept in the venv).
ensure_venv() {
  local extras="$1" python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "kernex: Python 3.11 or newer is required (found: $("$python" --version 2>&1))" >&2
    exit 1
  fi
  if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    ensure_debs python3-venv
  fi
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  local stamp=".venv/.kernex-installed" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "kernex: installing Python packages into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$want" >"$stamp"
  fi
}
