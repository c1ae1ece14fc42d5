#!/usr/bin/env bash
# The wheels a GPU call installs (.whl, ignored by git; carry [".whl"] once, it stays while the machine is warm):
# the server's packages (bench/gpu_session.sh serve) and gguf + transformers with its dependencies at the versions
# of this checkout's .venv (pyproject requires transformers >= 5.24; the GPU image has 5.17, which read Gemma-3's
# GGUF into a different model and lacks the `cache` output the server's engine uses). CPython 3.12, manylinux x86-64
# as the image. Usage: bash bench/gpu_wheels.sh   (after `make install`)
set -eu
cd "$(dirname "$0")/.."
PKGS="fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn openai jiter sniffio anyio
httpx httpcore h11 typer click prometheus_client typing_extensions shellingham httpx2 httpcore2 truststore
opentelemetry-api annotated-doc gguf transformers huggingface_hub tokenizers safetensors kernels hf-xet regex"
specs=()
for p in $PKGS; do
  v=$(.venv/bin/python -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$v" ] || { echo "not in .venv: $p (make install first)"; exit 1; }
  specs+=("$p==$v")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1))"
