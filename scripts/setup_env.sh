#!/usr/bin/env bash
# Create a virtual environment at $1 (default .venv) with bla_tvm installed (editable) and its test extras.
# torch is installed first as the plain 2.13.0 wheel (the CPU build on these machines); a user who already has
# a CUDA torch in their environment keeps it, since the package itself only asks for torch>=2.5.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e ".[test]"
