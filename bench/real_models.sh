#!/usr/bin/env bash
# The models issue's real-model table on the CPU: each run in its own process (so its peak host
# memory is its own), appended to bench/results/real_models.jsonl (a finished run is never redone:
# --skip-done; each VPTQ run's folder kept under $SAVE, default runs/real_models), then the table in bench/RESULTS.md is rebuilt from the records.
#   bash bench/real_models.sh                      # both models, every run (hours on 2 cores)
#   MODELS=gemma3-270m RUNS=fp,gptq3 bash bench/real_models.sh
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-gemma3-270m,qwen2.5-0.5b}
RUNS=${RUNS:-fp,rtn4,rtn3,gptq4,gptq3,preset2-oneshot,preset3-oneshot,preset4-oneshot}
RESULTS=bench/results/real_models.jsonl
for m in ${MODELS//,/ }; do
  path=$($PY bench/fetch_models.py "$m")
  for r in ${RUNS//,/ }; do
    $PY bench/quality.py --model "$path" --tag "$m" --results "$RESULTS" --only "$r" --skip-done --plan --save "${SAVE:-runs/real_models}"
  done
done
$PY bench/quality.py --results "$RESULTS" --report
