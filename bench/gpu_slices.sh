#!/usr/bin/env bash
# Cut a GGUF into the slices bench/gpu_presets.sh joins on the GPU machine: .gpu/p1 .. .gpu/pN (each at most
# SLICE_MB, default 50: a device call carries at most 64 MiB with the working tree, ~5 MB) and .gpu/model.sha256
# (the file's sha256), plus .gpu/test.txt (wikitext-2 test) and the gguf wheel in .whl.
#   bash bench/gpu_slices.sh smollm2|gemma3-270m|qwen2.5-0.5b|PATH.gguf
# Then one device call per slice, each carrying its own (carry [".gpu/pK"]; the first also ".gpu/test.txt",
# ".gpu/model.sha256", ".whl"), back to back so the machine stays warm (30 s idle gives it back), the last one
# `bash bench/gpu_presets.sh start [BITS...]`.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case $1 in
  smollm2) gguf=$($PY -c "from vptq.source import resolve; print(resolve('smollm2').uri)") ;;
  *.gguf) gguf=$1 ;;
  *) gguf=$($PY bench/fetch_models.py "$1") ;;
esac
rm -rf .gpu/p[0-9]* && mkdir -p .gpu .whl
split -b "${SLICE_MB:-50}m" -d -a 2 "$gguf" .gpu/slice
n=0
for f in .gpu/slice*; do n=$((n + 1)); mkdir -p ".gpu/p$n"; mv "$f" ".gpu/p$n/"; done
sha256sum "$gguf" | cut -c1-64 > .gpu/model.sha256
cp ../shared/data/wikitext-2/test.txt .gpu/test.txt
ls .whl/gguf-*.whl > /dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl gguf
echo "$gguf: $n slices in .gpu/p1 .. .gpu/p$n, sha256 $(cat .gpu/model.sha256)"
