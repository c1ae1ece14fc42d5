#!/usr/bin/env bash
# One GPU call's worth of kernel checks and timings (the device tool: each call under 10 minutes;
# its image has torch, numba-cuda and transformers but no prefect/sqlalchemy/boto3, hence
# --noconftest and only vptq/ + kernels/ imported). Stages, in the order given (default: all):
#   tests   the kernel tests on the GPU (row gemv, groups, dequantize): correctness first
#   probe   the row gemv's knobs on every 7B/70B shape (bench/gemv_rows_probe.py --variants)
#   table   the full kernel table of the batch-1 formats (bench/kernel_table.py)
#   decode  the Llama-2-7B-shaped decode step (bench/decode.py)
#   floor   what an empty launch costs under each timing protocol (bench/launch_floor.py)
#   dequant the row-staged dequantize's knobs and torch's write ceiling per shape (bench/dequant_probe.py;
#           DQ_VARIANTS, DQ_SHAPES override; default: the kernel and, where it reads consecutive codes
#           together (no permutation), the same without that: contig=0)
#   block7b the Llama-2-7B-shaped block quantized with the default k-means iterations (bench/block7b.py)
#   graph   the server's lone-sequence CUDA graph (serve/graph.py): logits against the eager engine, decode rate
#           with and without it (bench/serve_graph_check.py; SERVE_FORMATS, SERVE_CONFIG as for serve)
#   serve   `vptq serve --device cuda` under load (bench/serve_load.py, clients SERVE_CLIENTS, default
#           1,8,32): fp16 weights and the 2-bit preset's layout (random codes), the model of shape
#           SERVE_CONFIG (a config.json + tokenizer folder; default .gpu/smol, SmolLM2-135M's; other attention
#           layouts of that shape: bench/serve_shapes.py, e.g. gemma3_sw .gpu/gemma3_sw). Needs .whl.
# Output under $OUT (default bench/results/gpu_session), one log per stage; the raw records the
# scripts write go there too. Usage: bash bench/gpu_session.sh [stage ...]
# .gpu/wheels/*.whl (make gpu-wheels; carry [".gpu"]) are installed first: with pytest-xdist the
# tests stage runs TEST_WORKERS (default 12) processes, ~60-100 s instead of ~360 s (each test
# compiles its own kernels on the host).
# Env: TESTS_K (the tests stage's -k expression), FORMATS (default v4k256 and the 2-, 3- and 4-bit presets:
# v5k1024, v5k1024r32, v4k1024r64); VPTQ_BENCH_PERM=0
# (layers without a permutation, as the quantizer stores one group without outliers); VPTQ_BENCH_COMPILE=1 (decode: also
# the step through torch.compile, fp16 and the shared layouts, bench/decode.py); PROBE_<format>
# overrides a format's probe variants. Defaults: the plan and the opt-in (interleaved codes in the
# original column order), and 128-row tiles with it; half the codebook copies, 512-thread v4k256
# blocks and 48 registers were slower on every shape (bench/RESULTS.md, 2026-12-03 (6)).
set -u
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT"
export OUT
PY=${PY:-python}
FORMATS=${FORMATS:-v4k256,v5k1024,v5k1024r32,v4k1024r64}
PROBE_v4k256=${PROBE_v4k256:-;ilv=1;ilv=1,rw=128}
PROBE_v5k1024=${PROBE_v5k1024:-;ilv=1;ilv=1,rw=128}
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .gpu/wheels/*.whl > "$OUT/pip.log" 2>&1 || echo "wheels: see $OUT/pip.log"
fi
# .whl (bench/gpu_wheels.sh; carry it): the server's packages and the transformers this project requires (>= 5.24:
# the image's 5.17 is refused by vptq.source), installed here for every stage
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    > "$OUT/pip_whl.log" 2>&1 || echo "wheels: see $OUT/pip_whl.log"
  # the service's packages as the installed layout names them (vptq_service.cli = cli/, ...,
  # a namespace package: pyproject.toml), linked to this checkout instead of built
  mkdir -p /tmp/site/vptq_service
  for d in cli store tasks flows serve; do ln -sfn "$PWD/$d" "/tmp/site/vptq_service/$d"; done
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests probe table decode)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; git log --oneline -1 2>/dev/null
  $PY -c "import torch, numpy, numba, importlib.metadata as m; print('torch', torch.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__, 'numba-cuda', m.version('numba-cuda'))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
for s in "${stages[@]}"; do
  echo "== $s $(date -u +%H:%M:%S)"
  case $s in
    tests)  xd=()
            if $PY -c "import xdist" 2>/dev/null; then xd=(-n "${TEST_WORKERS:-12}"); fi
            $PY -m pytest --noconftest -q -p no:cacheprovider "${xd[@]}" tests/test_kernels.py \
              -k "${TESTS_K:-rows or group or dequant or shared_input or persist}" > "$OUT/tests.log" 2>&1 ;;
    probe)  for f in ${FORMATS//,/ }; do
              var="PROBE_$f"
              $PY -u bench/gemv_rows_probe.py --formats "$f" --variants "${!var:-;ilv=1}" > "$OUT/probe_$f.log" 2>&1
            done ;;
    table)  $PY -u bench/kernel_table.py --formats "$FORMATS" --no-assign --out "$OUT" > "$OUT/table.log" 2>&1 ;;
    decode) $PY -u bench/decode.py --gpu --formats "$FORMATS" --out "$OUT" > "$OUT/decode.log" 2>&1 ;;
    floor)  $PY -u bench/launch_floor.py > "$OUT/floor.log" 2>&1 ;;
    dequant) $PY -u bench/dequant_probe.py --formats "$FORMATS" --shapes "${DQ_SHAPES:-0,1,2,3,4,5}" \
              --variants "${DQ_VARIANTS:-h2=1;h2=1,contig=0}" \
              > "$OUT/dequant.log" 2>&1 ;;
    block7b) $PY -u bench/block7b.py --device cuda --kmeans-iters "${KMEANS_ITERS:-40}" --json \
              > "$OUT/block7b.log" 2>&1 ;;
    serve)  for f in $(echo "${SERVE_FORMATS:-fp16,v5k1024}" | tr , ' '); do
              $PY -u bench/serve_load.py --config "${SERVE_CONFIG:-.gpu/smol}" --format "$f" --device cuda \
                --clients "${SERVE_CLIENTS:-1,8,32}" --max-batch 32 --requests "${SERVE_REQUESTS:-4}" \
                --max-tokens "${SERVE_TOKENS:-64}" --out "$OUT/serve_cuda_$f.json" > "$OUT/serve_$f.log" 2>&1
            done ;;
    graph)  $PY -u bench/serve_graph_check.py --config "${SERVE_CONFIG:-.gpu/smol}" --formats "${SERVE_FORMATS:-fp16,v5k1024}" \
              --out "$OUT/serve_graph.json" > "$OUT/graph.log" 2>&1 ;;
    *) echo "unknown stage $s (tests, probe, table, decode, floor, dequant, block7b, serve, graph)"; exit 2 ;;
  esac
  echo "   rc=$? $(date -u +%H:%M:%S)"; tail -n 3 "$OUT"/*"$s"*.log 2>/dev/null | tail -n 8
done
