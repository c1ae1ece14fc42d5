#!/usr/bin/env bash
# One GPU call (< 10 minutes) for VQuantLinear above the fused gemv's 8 token rows (kernels/dispatch.py):
# the kernel tests of the routes, bench/rows_route_probe.py (per-layer times of each route), then
# `vptq serve --device cuda` under load with fp16 weights, the 2-bit layout on the default route (the
# prepared dequantize + cuBLAS) and the 2-bit layout with VPTQ_CHUNKED_ROWS=32 (the gemv on chunks of
# 8 rows). Needs .whl and .gpu (bench/gpu_session.sh). Output under $OUT (default bench/results/gpu_rows).
# Env: PROBE_ROWS (default 9,16,32,64), PROBE_FORMATS (default v5k1024), CLIENTS (default 8,32),
# REQUESTS (default 2). The device tool brings back at most 8 files: the logs end up in one logs.tgz beside
# the JSON records (rows_route.json, serve_cuda_{fp16,v5k1024}.json, chunked_serve_cuda_v5k1024.json).
set -u
OUT=${OUT:-bench/results/gpu_rows}
mkdir -p "$OUT/chunked"
export OUT
TESTS_K="above_eight or routes_to_kernels or dequant" timeout 130 bash bench/gpu_session.sh tests
tail -n 2 "$OUT/tests.log"
timeout 80 python -u bench/rows_route_probe.py --formats "${PROBE_FORMATS:-v5k1024}" --rows "${PROBE_ROWS:-9,16,32,64}" \
  --out "$OUT/rows_route.json" > "$OUT/rows_route.log" 2>&1
tail -n 40 "$OUT/rows_route.log"
SERVE_FORMATS=fp16,v5k1024 SERVE_CLIENTS=${CLIENTS:-8,32} SERVE_REQUESTS=${REQUESTS:-2} timeout 230 \
  bash bench/gpu_session.sh serve
VPTQ_CHUNKED_ROWS=32 OUT=$OUT/chunked SERVE_FORMATS=v5k1024 SERVE_CLIENTS=${CLIENTS:-8,32} SERVE_REQUESTS=${REQUESTS:-2} \
  timeout 130 bash bench/gpu_session.sh serve
for f in "$OUT"/serve_cuda_*.json "$OUT"/chunked/serve_cuda_*.json; do
  [ -f "$f" ] && python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], [(l.get('clients'), l.get('tokens_per_s'), l.get('errors')) for l in d.get('levels', d.get('rows', []))])" "$f"
done
[ -f "$OUT/chunked/serve_cuda_v5k1024.json" ] && mv "$OUT/chunked/serve_cuda_v5k1024.json" "$OUT/chunked_serve_cuda_v5k1024.json"
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls -d *.log *.txt chunked 2>/dev/null))
ls "$OUT"
