"""The CI quality gate (the quality issue, part 3): the real SmolLM2 with its first GATE_BLOCKS blocks
quantized at each preset's layout (vector length, codebook sizes, outliers, Hessian mode: the preset's
config) one-shot, with GATE_ITERS' k-means and refinement rounds instead of the preset's (the gate has
under 4 minutes on one core for all three presets), scored on a fixed short window set of the *selection* part of wikitext-2 valid (vptq/splits.py; never test text), must land within a band of the
recorded perplexity. The record and its band come from a seed sweep on this code:

    python tests/test_quality_gate.py --record        # seeds 0-2 per preset -> tests/data/quality_gate.json

(and a raw copy appended to bench/results/quality_gate.jsonl). The 2-bit run is also the suite's real-model
checkpoint round trip (saved, loaded back, scored from the folder). The gate runs seed 0 and allows what another seed
does to it: the band is 1.25 x the largest deviation of seeds 1 and 2 from seed 0 (at least GATE_FLOOR), on
the view that another machine's float rounding moves k-means no more than another seed; it must stay under
10 % so that a 10 % perplexity regression fails.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "quality_gate.json"
GATE_BLOCKS = 1  # of 30 (2 blocks took 290 s on one CI-like core, over the gate's 4 minutes)
CALIB_WINDOWS, CALIB_SEQLEN = 16, 256
EVAL_WINDOWS, EVAL_SEQLEN = 4, 512
GATE_ITERS = dict(kmeans_iters=4, refine_iters=1)
GATE_FLOOR = 0.02  # the smallest band: machines differ in float rounding, which moves k-means a little
SEEDS = (0, 1, 2)


def gate_inputs():
    """(FP model, tokenizer, calibration ids, selection ids): SmolLM2 and the two parts of wikitext-2 valid."""
    from vptq.evaluate import tokenize_text
    from vptq.pipeline import PACKAGE_CALIB
    from vptq.source import load_model, resolve
    from vptq.splits import split_valid

    model, tok = load_model(resolve("smollm2"))
    calib, select = split_valid(PACKAGE_CALIB.read_text(encoding="utf-8"))
    return model, tok, tokenize_text(tok, calib), tokenize_text(tok, select)


def gate_model(fp, calib_ids, bits: int, seed: int = 0):
    """(copy of fp with its first GATE_BLOCKS blocks quantized at preset(bits) one-shot, its report),
    calibrated on windows drawn with `seed`."""
    from vptq.config import resolve
    from vptq.evaluate import calibration_windows
    from vptq.sequential import quantize_model

    model = copy.deepcopy(fp)
    cfg, _ = resolve(bits, dict(e2e_steps=0, **GATE_ITERS), seed=seed)  # as a one-shot job resolves it
    rep = quantize_model(model, calibration_windows(calib_ids, CALIB_WINDOWS, CALIB_SEQLEN, seed), cfg,
                         blocks=GATE_BLOCKS)
    return model, rep


def gate_perplexity(model, select_ids) -> float:
    from vptq.evaluate import perplexity

    return perplexity(model, select_ids, windows=EVAL_WINDOWS, seqlen=EVAL_SEQLEN).perplexity


def gate_band(seeds: dict[str, float]) -> float:
    """The relative band around seed 0's perplexity (see the module doc)."""
    return max(1.25 * max(abs(v / seeds["0"] - 1) for v in seeds.values()), GATE_FLOOR)


@pytest.fixture(scope="module")
def inputs():
    return gate_inputs()


def test_each_preset_one_shot_stays_within_its_recorded_band(inputs, tmp_path):
    from vptq.io import load_quantized, save_quantized

    fp, tok, calib_ids, select_ids = inputs
    rec = json.loads(RECORD.read_text())
    fp_ppl = gate_perplexity(fp, select_ids)
    assert fp_ppl == pytest.approx(rec["fp"], rel=1e-3)  # the FP model and the windows are those recorded
    for bits in (2, 3, 4):
        r = rec["presets"][str(bits)]
        band = gate_band(r["seeds"])
        assert band < 0.10  # a 10 % regression must fail the gate
        model, rep = gate_model(fp, calib_ids, bits, seed=0)
        assert len(rep.layers) == 7 * GATE_BLOCKS and rep.bpw < bits + 0.3
        if bits == 2:  # the real model's checkpoint round trip: what is scored is the saved folder
            model = load_quantized(save_quantized(model, tmp_path / "q2", tok))
        got = gate_perplexity(model, select_ids)
        assert got > fp_ppl  # quantizing blocks costs something: the gate measures the quantized path
        seed0 = r["seeds"]["0"]
        assert abs(got / seed0 - 1) <= band, (
            f"{bits}-bit preset, {GATE_BLOCKS} blocks one-shot: perplexity {got:.3f} is outside "
            f"{seed0:.3f} +/- {band:.1%} (seeds {r['seeds']}); a real change of quality must "
            "re-record: python tests/test_quality_gate.py --record")


def record() -> None:
    import platform
    from datetime import UTC, datetime

    t0 = time.perf_counter()
    fp, _tok, calib_ids, select_ids = gate_inputs()
    fp_ppl = gate_perplexity(fp, select_ids)
    out = {"fp": fp_ppl, "blocks": GATE_BLOCKS, "iters": GATE_ITERS, "calib": [CALIB_WINDOWS, CALIB_SEQLEN],
           "eval": [EVAL_WINDOWS, EVAL_SEQLEN], "presets": {},
           "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__}
    for bits in (2, 3, 4):
        seeds = {}
        for s in SEEDS:
            t = time.perf_counter()
            seeds[s] = gate_perplexity(gate_model(fp, calib_ids, bits, seed=s)[0], select_ids)
            print(f"{bits}-bit seed {s}: {seeds[s]:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
        seeds = {str(k): v for k, v in seeds.items()}
        out["presets"][str(bits)] = {"seeds": seeds, "band": gate_band(seeds)}
    out["seconds"] = time.perf_counter() - t0
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(out, indent=1) + "\n")
    with (ROOT / "bench" / "results" / "quality_gate.jsonl").open("a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
