#!/usr/bin/env bash
# Download into .whl/ the wheels the lent GPU machine lacks for this project (it has no internet), for its
# Python 3.12 on x86-64 Linux (glibc 2.31 or later, which llguidance's wheel needs); bench/gpu.sh installs them
# there. Versions are the project's .venv's, so the carried grpcio and protobuf match the code that grpcio-tools
# generated in cluster/rpc/pb.
#
#   bash bench/fetch_gpu_wheels.sh      then carry [".whl", "cluster/rpc/pb"] in the device call
#
# The machine already has (/work/.library/device/KINDS.md): numpy, safetensors, tokenizers, jinja2, click,
# huggingface-hub, tqdm, psutil, anyio, h11, annotated-doc, pytest, torch, transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# what is missing there: the runtime dependencies of pyproject.toml and theirs
NAMES=(
  tinygrad
  grpcio grpcio-health-checking protobuf         # generated code checks grpcio >= 1.85.1, protobuf 7.x
  zeroconf ifaddr
  cryptography cffi pycparser
  pydantic pydantic-core annotated-types typing-inspection typing-extensions  # pydantic-core needs t-e >= 4.16
  fastapi starlette opentelemetry-api uvicorn
  llguidance                                     # constrained decoding (structured output)
)
PLATFORMS=(manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pins=()
for name in "${NAMES[@]}"; do
  v=$("$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name") || {
    echo "$name is not installed in $PY: make install first" >&2
    exit 1
  }
  pins+=("$name==$v")
done

rm -rf .whl
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
# pure py3-none-any wheels match these tags too, so one call fetches both kinds
"$PY" -m pip download -q "${args[@]}" -d .whl "${pins[@]}" 2>&1 | { grep -v "is ignored: it is neither" || true; }

missing=0
for pin in "${pins[@]}"; do
  stem=$(echo "${pin%%==*}" | tr '-' '_')
  n=$(find .whl -maxdepth 1 -iname "${stem}-${pin##*==}-*.whl" | wc -l)
  if ((n != 1)); then
    echo "expected one wheel for $pin, found $n" >&2
    missing=1
  fi
done
((missing == 0)) || exit 1
ls -1 .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB"
if ((total >= 40 * 1024 * 1024)); then
  echo "over 40 MiB: the working tree that travels is limited to 64 MiB" >&2
  exit 1
fi
