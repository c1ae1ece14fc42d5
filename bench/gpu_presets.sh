#!/usr/bin/env bash
# The fine-tuned presets on the quality issue's protocol, three seeds each, on one GPU machine of the device
# tool (its image has no `gguf` package and a call carries at most 64 MiB: the GGUF travels in slices
# .gpu/MODEL/p1..pN over consecutive calls while the machine stays warm, and the gguf wheel in .whl;
# bench/gpu_slices.sh cuts them). MODEL (default smollm2) names the slices' folder, TAG (default smollm2-135m)
# the model in the records, SEEDS (default "0 1 2") the seeds, MIX=1 calibrates on the calibration mix
# (quality.py --mix, docs/calibration-mix.md); several models may run at once. .whl (carried once) holds gguf and
# transformers >= 5.24 with its dependencies: bench/gpu_slices.sh downloads them.
#
#   bash bench/gpu_presets.sh start [BITS|RUN...]  join + check the GGUF (once), launch every (preset, seed) run in
#                                                its own session (setsid: it outlives this call), return at once; a
#                                                number names the fine-tuned preset of those bits, a word any run
#                                                of bench/quality.py (e.g. preset3-oneshot), NAME:BITS:k=v,...
#                                                a --custom run of it
#   bash bench/gpu_presets.sh wait SECONDS      wait for the runs (at most SECONDS), then copy the records and
#                                                logs to $OUT
#
# Each run: `python bench/quality.py --device cuda --split --ood --seed S --only <the preset's run>`, i.e.
# calibration from wikitext-2 valid's calibration part, selection perplexity from its selection part, test
# and the out-of-domain corpora reported, one process per run, 1 CPU thread each (9 runs share 16 cores).
set -u
MODEL=${MODEL:-smollm2}
RUNS=runs/presets
OUT=${OUT:-$RUNS/out}
mkdir -p "$RUNS" "$OUT"
PY=${PY:-python3}
case ${1:-} in
  start)
    shift
    if [ ! -f "runs/$MODEL.gguf" ]; then
      n=$(ls -d .gpu/"$MODEL"/p[0-9]* | wc -l)
      for i in $(seq 1 "$n"); do cat .gpu/"$MODEL"/p"$i"/*; done > "runs/$MODEL.gguf.partial"
      echo "$(cat .gpu/"$MODEL"/sha256)  runs/$MODEL.gguf.partial" | sha256sum -c || exit 1
      mv "runs/$MODEL.gguf.partial" "runs/$MODEL.gguf"
    fi
    # .whl: gguf and the transformers this project requires (pyproject: >=5.24); the image's 5.17 read
    # Gemma-3's GGUF into a different model (FP perplexity 196 against 46 on CPU with 5.25: RESULTS.md)
    [ -d runs/site/transformers ] || $PY -m pip install -q --no-index --no-deps --no-compile --target runs/site .whl/*.whl \
      || exit 1
    # the floor is vptq.source's (one rule): refused here before any run starts
    PYTHONPATH=runs/site $PY -c "from vptq.source import check_transformers; check_transformers()" || exit 1
    for arg in ${*:-2 3 4}; do
      custom=()
      case $arg in
        [0-9]) name=$($PY -c "import sys; sys.argv=['q']; sys.path.insert(0, 'bench'); import quality; print(quality.PRESET_RUNS[$arg])") ;;
        *:*) name=${arg%%:*}; custom=(--custom "$arg") ;;  # NAME:BITS:field=value,...: a --custom run of quality.py
        *) name=$arg ;;
      esac
      for seed in ${SEEDS:-0 1 2}; do
        PYTHONPATH=runs/site OMP_NUM_THREADS=1 setsid nohup $PY -u bench/quality.py --device cuda \
          --model "runs/$MODEL.gguf" --tag "${TAG:-smollm2-135m}" --calib vptq/data/wikitext2-valid.txt --test .gpu/test.txt --split --ood \
          --seed "$seed" --only "$name" "${custom[@]}" ${MIX:+--mix} --results "$RUNS/presets.jsonl" > "$RUNS/$MODEL-$name${MIX:++mix}-seed$seed.log" 2>&1 < /dev/null &
      done
    done
    sleep 5; ls "$RUNS"; nvidia-smi --query-gpu=memory.used --format=csv ;;
  wait)
    deadline=$(( $(date +%s) + ${2:-500} ))
    while pgrep -f 'bench/[q]uality[.]py' > /dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 10; done
    cp "$RUNS"/presets.jsonl "$OUT"/ 2>/dev/null
    tail -n 2 "$RUNS"/*.log > "$OUT/presets_logs.txt" 2>&1
    cat "$OUT/presets_logs.txt"; pgrep -fa 'bench/[q]uality[.]py' | cut -c1-200 ;;
  *) echo "usage: bash bench/gpu_presets.sh start [BITS...] | wait SECONDS"; exit 2 ;;
esac
