#!/usr/bin/env bash
# The GPU figures in one command, from a fresh checkout (BENCHMARKS.md, "GPU figures"):
#
#   bash benchmarks/gpu.sh [--out DIR] [--budget-s N] [--wheels DIR] [--python PY] [--setup-only] [--dry-run]
#                          [gpu.py flags: --only SECTIONS, --pipeline-images N, --workers N]
#
# Writes DIR/gpu-results.md, DIR/gpu-results.json and DIR/gpu.log (default DIR: gpu-results), rewritten after
# every section, so a run cut short keeps what it measured. --dry-run: the same sections at tiny sizes on the CPU.
#
# The Python it runs, the first that works of:
#   1. --python PY (or $PYTHON)
#   2. .venv/bin/python, when it imports the project (`make install` made it) and no --wheels are given
#   3. .venv-gpu: a venv that sees the packages of the machine's own python3 (BASE_PYTHON; a .pth file, which also
#      works when that python3 is itself a venv, as on the device machines), so its CUDA torch stays; this checkout
#      on its path (no build), then the project's dependencies but torch and torchvision, from --wheels DIR
#      (offline: pip --no-index --no-deps, every wheel there, on every call) or else from the package index
# --setup-only stops there (a first call that brings some of the wheels; a second brings the rest and runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
WHEELS=""
SETUP_ONLY=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

# The project's dependencies from pyproject.toml, less torch and torchvision (the machine's CUDA build stays),
# plus the spaCy English pipeline the nouns stage loads.
deps() {
  "$1" - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
keep = [d for d in p["dependencies"] if re.split(r"[\s=<>!;\[]", d)[0] not in ("torch", "torchvision")]
print("\n".join(keep + p["optional-dependencies"]["spacy-model"] + ["scikit-image", "psutil"]))
EOF
}

imports_ok() {
  "$1" -c "import torch, subjectdiff.datagen.config, segment_anything" >/dev/null 2>&1
}

if [ -z "$PY" ] && [ -z "$WHEELS" ] && [ -x .venv/bin/python ] && imports_ok .venv/bin/python; then
  PY=.venv/bin/python
fi
if [ -z "$PY" ]; then
  VENV="${GPU_VENV:-.venv-gpu}"
  BASE="${BASE_PYTHON:-python3}"
  PY="$VENV/bin/python"
  fresh=""
  if [ ! -x "$PY" ]; then
    echo "[gpu.sh] setting up $VENV over $(command -v "$BASE") (its torch stays)" >&2
    "$BASE" -m venv --without-pip "$VENV"
    # the machine's packages after the venv's own: what the venv installs (transformers < 5, say) wins. Added
    # with site.addsitedir, so that the .pth files there (namespace packages, path hooks) work as in that Python
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$BASE" -c 'import site; print("import site; list(map(site.addsitedir, %r))" % site.getsitepackages())' \
      > "$SITE/_machine.pth"
    # the project from this checkout without a build (nothing to fetch offline): subjectdiff's folder on the
    # path, and the repo root in its package path, so subjectdiff.datagen is datagen/ (pyproject's package-dir)
    printf '%s\nimport subjectdiff; subjectdiff.__path__.append(%s)\n' "$PWD" "'$PWD'" > "$SITE/_subjectdiff.pth"
    fresh=1
  fi
  pip=("$BASE" -m pip --python "$PY")
  if [ -n "$WHEELS" ]; then  # every time: several calls may each bring some of the wheels
    "${pip[@]}" install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
  elif [ -n "$fresh" ]; then
    deps "$PY" > "$VENV/requirements.txt"
    "${pip[@]}" install -q -r "$VENV/requirements.txt"
  fi
fi
echo "[gpu.sh] python: $PY" >&2
[ -z "$SETUP_ONLY" ] || exit 0
exec "$PY" benchmarks/gpu.py "${ARGS[@]}"
