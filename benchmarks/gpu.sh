#!/usr/bin/env bash
# The GPU figures in one command, from a fresh checkout (BENCHMARKS.md, "GPU figures"):
#
#   bash benchmarks/gpu.sh [--out DIR] [--budget-s N] [--wheels DIR] [--python PY] [--dry-run] [gpu.py flags]
#
# Writes DIR/gpu-results.md, DIR/gpu-results.json and DIR/gpu.log (default DIR: gpu-results), rewritten after
# every section, so a run cut short keeps what it measured. --dry-run: the same sections at tiny sizes on the CPU.
#
# The Python it runs, the first that works of:
#   1. --python PY (or $PYTHON)
#   2. .venv/bin/python, when it imports the project (`make install` made it)
#   3. .venv-gpu: a venv that sees the packages of the machine's own python3 (BASE_PYTHON; a .pth file, which also
#      works when that python3 is itself a venv, as on the device machines), so its CUDA torch stays; the project
#      installed into it (--no-deps), then the project's dependencies but torch and torchvision, from --wheels DIR
#      (offline: pip --no-index --no-deps, every wheel there) or else from the package index
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
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

if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && imports_ok .venv/bin/python; then
    PY=.venv/bin/python
  else
    VENV="${GPU_VENV:-.venv-gpu}"
    BASE="${BASE_PYTHON:-python3}"
    if ! { [ -x "$VENV/bin/python" ] && imports_ok "$VENV/bin/python"; }; then
      echo "[gpu.sh] setting up $VENV over $(command -v "$BASE") (its torch stays)" >&2
      "$BASE" -m venv --without-pip "$VENV"
      # the machine's packages after the venv's own: what the venv installs (transformers < 5, say) wins
      "$BASE" -c 'import site; print("\n".join(site.getsitepackages()))' \
        > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_machine.pth"
      pip=("$BASE" -m pip --python "$VENV/bin/python")
      "${pip[@]}" install -q --no-deps --no-build-isolation -e .
      if [ -n "$WHEELS" ]; then
        "${pip[@]}" install -q --no-index --no-deps "$WHEELS"/*.whl
      else
        deps "$VENV/bin/python" > "$VENV/requirements.txt"
        "${pip[@]}" install -q -r "$VENV/requirements.txt"
      fi
    fi
    PY="$VENV/bin/python"
  fi
fi
echo "[gpu.sh] python: $PY" >&2
exec "$PY" benchmarks/gpu.py "${ARGS[@]}"
