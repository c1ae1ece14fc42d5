"""Artifact bytes of fixed requests: run before and after a refactor, the two JSON files must match.

    python bench/artifact_hashes.py --out bench/results/artifact_hashes_after.json [--smollm2]
    PYTHONPATH=OLD_TREE python bench/artifact_hashes.py --module cli.main --cwd OLD_TREE --out before.json

Each request runs `vptq compress ... --json --out DIR` in a fresh VPTQ_HOME through the CLI module
given (the import root moved in the structure refactor, so the module is a parameter); the record is
the sha256 of every file of the exported artifact. The tiny models are 2-block random Llamas saved
as sharded safetensors (so block streaming is exercised) with SmolLM2's tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "vptq" / "data" / "wikitext2-valid.txt"

TINY = [
    ("tiny-2bit-original", ["--bits", "2", "--finetune-steps", "0", "--hessians", "original"]),
    ("tiny-2bit-sequential", ["--bits", "2", "--finetune-steps", "0", "--hessians", "sequential"]),
    ("tiny-3bit-finetune", ["--bits", "3", "--finetune-steps", "8", "--nsamples", "8"]),
    ("tiny-4bit-blockft", ["--bits", "4", "--finetune-steps", "0", "--hessians", "sequential", "--set", "finetune_steps=4"]),
]
SMOL = [("smollm2-2bit", ["--bits", "2", "--finetune-steps", "0", "--nsamples", "16"])]


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vptq.source import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="2MB")
    tok.save_pretrained(folder)
    return folder


# Fields that differ between any two runs of the same code (a temporary path, a clock, the code's own
# hash, timings): dropped before hashing the JSON files, so "normalized" compares the rest of them.
VOLATILE = ("_name_or_path", "published_at", "code_version", "checkpoint_sha256", "seconds", "time", "created", "rss",
            "source", "uri", "path")
VOLATILE_FILES = ("config.json", "manifest.json", "vptq_report.json")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items()
                if not any(w in k for w in VOLATILE) and k not in VOLATILE_FILES}
    if isinstance(x, list):
        return [_strip(v) for v in x if not (isinstance(v, dict) and v.get("path") in VOLATILE_FILES)]
    return x


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def normalized_hashes(folder: Path) -> dict[str, str]:
    """Every file's sha256, the JSON files' after dropping their volatile fields."""
    out = file_hashes(folder)
    for name in VOLATILE_FILES:
        if (folder / name).is_file():
            data = _strip(json.loads((folder / name).read_text()))
            out[name] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return out


def run(module: str, cwd: Path, source: str, args: list[str], work: Path) -> dict:
    env = dict(os.environ, VPTQ_HOME=str(work / "home"), PREFECT_HOME=str(work / "prefect"))
    out = work / "artifact"
    cmd = [sys.executable, "-m", module, "compress", source, *args, "--seqlen", "128", "--calib", str(TEXT),
           "--eval-windows", "0", "--json", "--out", str(out)]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout)
    return {"command": cmd[2:], "seconds": round(time.time() - t0, 1), "bpw": s.get("bpw"), "files": file_hashes(out),
            "normalized": normalized_hashes(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="vptq_service.cli.main")
    ap.add_argument("--cwd", type=Path, default=REPO)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smollm2", action="store_true", help="also the bundled SmolLM2-135M (minutes on 2 cores)")
    ap.add_argument("--only", default="", help="comma-separated entry names (default: all)")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as td:
        model = tiny_model(Path(td) / "tiny-llama")
        for name, args in TINY + (SMOL if a.smollm2 else []):
            if a.only and name not in a.only.split(","):
                continue
            src = "smollm2" if name.startswith("smollm2") else str(model)
            with tempfile.TemporaryDirectory() as work:
                results[name] = run(a.module, a.cwd, src, args, Path(work))
            print(f"{name}: {results[name]['seconds']} s, {len(results[name]['files'])} files", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
