#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): from a clean copy of the repo on a GPU machine that
# has torch with CUDA, triton and transformers. The wheels the nodes need beside those, fetched
# by scripts/gpu_wheels.sh into .whl/ (carried beside the copy), are installed first, offline,
# into a folder of their own put first on PYTHONPATH. `--dry-run` prints the plan (works on CPU).
# The last line printed is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="${PDSERVE_WHEEL_SITE:-/tmp/pdserve-site}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >&2 || echo "wheels: some failed to install" >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_check.py "$@"
