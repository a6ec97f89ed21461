#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): from a clean copy of the repo on a GPU machine that
# has torch with CUDA, triton and transformers. Small pure-Python wheels the nodes need and the
# machine lacks may sit in wheels/ beside the repo copy: they are installed first, offline.
# `--dry-run` prints the plan (works on CPU). The last line printed is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps wheels/*.whl >&2 || echo "wheels: some failed to install" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_check.py "$@"
