#!/usr/bin/env bash
# Cut a GGUF into the slices bench/gpu_presets.sh joins on the GPU machine: .gpu/NAME/p1 .. .gpu/NAME/pN (each at
# most SLICE_MB MiB, default 55: a device call carries at most 64 MiB with the working tree, ~6.2 MiB) and
# .gpu/NAME/sha256 (the file's sha256), plus .gpu/test.txt (wikitext-2 test) and the wheels in .whl (bench/gpu_wheels.sh).
#   bash bench/gpu_slices.sh smollm2|gemma3-270m|qwen2.5-0.5b|PATH.gguf [NAME]    (NAME defaults to the first)
# Then one device call per slice, each carrying its own (carry [".gpu/NAME/pK"]), and one call for ".whl" (~32 MiB:
# it fits beside a slice only under ~25 MiB), ".gpu/test.txt" and ".gpu/NAME/sha256", back to back so the machine
# stays warm (30 s idle gives it back), the last one
# `MODEL=NAME TAG=... bash bench/gpu_presets.sh start [BITS...]`.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case $1 in
  smollm2) gguf=$($PY -c "from vptq.source import resolve; print(resolve('smollm2').uri)") ;;
  *.gguf) gguf=$1 ;;
  *) gguf=$($PY bench/fetch_models.py "$1") ;;
esac
name=${2:-$(basename "$1" .gguf)}
dir=.gpu/$name
rm -rf "$dir" && mkdir -p "$dir" .whl
split -b "${SLICE_MB:-55}m" -d -a 2 "$gguf" "$dir/slice"
n=0
for f in "$dir"/slice*; do n=$((n + 1)); mkdir -p "$dir/p$n"; mv "$f" "$dir/p$n/"; done
sha256sum "$gguf" | cut -c1-64 > "$dir/sha256"
cp ../shared/data/wikitext-2/test.txt .gpu/test.txt
ls .whl/transformers-*.whl > /dev/null 2>&1 || bash bench/gpu_wheels.sh
echo "$gguf: $n slices in $dir/p1 .. $dir/p$n, sha256 $(cat "$dir/sha256")"
