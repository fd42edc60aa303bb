#!/usr/bin/env bash
# Install each contrib package (plugins_contrib/*/) into the current venv (--no-deps -e), run its
# tests with pytest, and uninstall it again, so the core's own tests never depend on it.
# The venv: $VIRTUAL_ENV when one is active, else .venv. Exits non-zero if any package fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${VIRTUAL_ENV:-}" ]]; then PY="$VIRTUAL_ENV/bin/python"; else PY="$PWD/.venv/bin/python"; fi

installed=()
cleanup() {
  if ((${#installed[@]})); then "$PY" -m pip uninstall -q -y "${installed[@]}"; fi
}
trap cleanup EXIT

failed=()
for dir in plugins_contrib/*/; do
  [[ -f "$dir/pyproject.toml" ]] || continue
  name=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["name"])' "$dir/pyproject.toml")
  echo "== $name ($dir)"
  "$PY" -m pip install -q --no-deps -e "$dir"
  installed+=("$name")
  (cd "$dir" && "$PY" -m pytest -q -p no:cacheprovider) || failed+=("$name")
done

if ((${#failed[@]})); then
  echo "contrib tests failed: ${failed[*]}" >&2
  exit 1
fi
