#!/usr/bin/env bash
# CI: the interpret and compile tiers again under triton 3.6, the version the GPU machines run, so
# a kernel that only works with the newest triton (e.g. a literal typed differently, a construct
# its compiler rejects) fails here too.
# Run from the repo root after the package is installed: a throwaway venv sees the system
# packages (torch, this package) and shadows triton with 3.6.0. It also takes numpy < 2.4:
# triton 3.6's interpreter turns a scalar kernel argument into an int with int() of a
# 1-element array (a loop bound like range(0, T, BLOCK)), which numpy 2.4 made an error
# (fixed in triton >= 3.7, which squeezes the array first).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$(mktemp -d "${TMPDIR:-/tmp}/ssam-triton36.XXXXXX")"
trap 'rm -rf "$venv"' EXIT

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
"${PYTHON:-python3}" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "triton==3.6.0" "numpy<2.4"
"$venv/bin/python" -c 'import numpy, torch, triton; print(f"ci: interpret and compile tiers with triton {triton.__version__} (numpy {numpy.__version__}, torch {torch.__version__})")'
TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -m "interpret or compile" tests -q -p no:cacheprovider
