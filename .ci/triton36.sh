#!/usr/bin/env bash
# CI: the interpret and compile tiers again under triton 3.6, the version the GPU machines run, so
# a kernel that only works with the newest triton (e.g. a literal typed differently, a construct
# its compiler rejects) fails here too.
# Run from the repo root after the package is installed. triton 3.6 (and numpy < 2.4) go into a
# throwaway folder put first on PYTHONPATH, shadowing the installed triton and numpy: this works in
# whatever environment runs it (a virtual environment included, where a --system-site-packages
# venv would not see the environment's torch). numpy < 2.4: triton 3.6's interpreter turns a
# scalar kernel argument into an int with int() of a 1-element array (a loop bound like
# range(0, T, BLOCK)), which numpy 2.4 made an error (fixed in triton >= 3.7).
set -euo pipefail
cd "$(dirname "$0")/.."

shadow="$(mktemp -d "${TMPDIR:-/tmp}/ssam-triton36.XXXXXX")"
trap 'rm -rf "$shadow"' EXIT

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
py="${PYTHON:-python3}"
"$py" -m pip install -q --target "$shadow" "triton==3.6.0" "numpy<2.4"
export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import numpy, torch, triton; print(f"ci: interpret and compile tiers with triton {triton.__version__} (numpy {numpy.__version__}, torch {torch.__version__})")'
"$py" -c 'import triton; assert triton.__version__ == "3.6.0", triton.__version__'
TRITON_INTERPRET=1 "$py" -m pytest -m "interpret or compile" tests -q -p no:cacheprovider
