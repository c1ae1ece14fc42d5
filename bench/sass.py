"""Static profile of the batch-1 row gemv (kernels/gemv_rows.py) as an H100/H200 runs it, without a GPU.

    python -u bench/sass.py [--formats v5k1024,v4k256] [--shapes 8192x8192,...] [--variants "...;..."]
                            [--cc 90] [--dump DIR]

Needs NVIDIA's compiler wheels (`make sass-tools`: nvidia-nvvm, nvidia-cuda-nvrtc for numba-cuda's
code generation; nvidia-cuda-nvcc for ptxas, nvidia-cuda-nvdisasm), not a driver. For each format,
shape and variant (bench/gemv_rows_probe.py's --variants keys) the plan is built on the CPU as it
would be on the device (its SM count and shared memory given by --sms / --smem-kib), the kernel is
compiled to PTX by numba-cuda and to SASS by ptxas at the plan's register cap, and the script
prints what ptxas reports (registers, spills) and the instruction mix of the hot loop: the
innermost loop with the most shared-memory loads, one step of codes per iteration, so its
instructions per code are what a warp issues per 32 codes of a row. A GPU run still decides
(bench/gemv_rows_probe.py); this shows what a change did to the code before one is lent.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# instruction classes of the summary, by opcode prefix (first match wins)
CLASSES = [("local", "LDL"), ("local", "STL"), ("lds128", "LDS.128"), ("lds64", "LDS.64"), ("lds", "LDS"), ("ldg", "LDG"), ("sts", "STS"),
           ("stg", "STG"), ("atom", "ATOM"), ("red", "RED"), ("hfma2", "HFMA2"), ("hadd2", "HADD2"),
           ("prmt", "PRMT"), ("ffma", "FFMA"), ("fadd", "FADD"), ("fmul", "FMUL"), ("cvt", "F2F"), ("cvt", "F2FP"),
           ("cvt", "I2F"), ("cvt", "F2I"), ("branch", "BRA"), ("branch", "BSSY"), ("branch", "BSYNC"),
           ("bar", "BAR"), ("mov", "MOV"), ("mov", "IMAD.MOV"), ("mov", "CS2R"), ("mov", "S2R"), ("mov", "S2UR"),
           ("mov", "R2UR"), ("mov", "UMOV"), ("mov", "LDC"), ("mov", "ULDC")]
_INS = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")
_PRED = re.compile(r"^@!?U?P[T\d]+\s+")


def opcode(text: str) -> str:
    """Opcode of one SASS instruction text (predicate guard stripped), modifiers included."""
    return _PRED.sub("", text).split()[0]


def klass(op: str) -> str:
    for name, prefix in CLASSES:
        if op.startswith(prefix):
            return name
    return "int" if op[0] in "ILSUV" or op.startswith(("LOP", "SHF", "LEA", "SEL", "POPC", "FLO")) else "other"


def parse(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(instructions as (address, text), label -> address of the instruction after it) of an
    `nvdisasm -c` listing."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(line)
        if m:
            addr = int(m.group(1), 16)
            labels.update((lab, addr) for lab in pending)
            pending = []
            ins.append((addr, m.group(2)))
    return ins, labels


def loops(ins: list[tuple[int, str]], labels: dict[str, int]) -> list[tuple[int, int]]:
    """Loops as (first, last) instruction positions: each backward branch and its target."""
    pos = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i, (a, t) in enumerate(ins):
        m = _BRA.search(t)
        if m and m.group(1) in labels and labels[m.group(1)] <= a:
            out.append((pos[labels[m.group(1)]], i))
    return out


def hot_loop(ins: list[tuple[int, str]], labels: dict[str, int]) -> tuple[int, int] | None:
    """The innermost loop (none nested in it) with the most shared-memory loads, or None."""
    ls = loops(ins, labels)
    inner = [(s, e) for s, e in ls if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in ls)]
    if not inner:
        return None
    return max(inner, key=lambda se: (sum(opcode(t).startswith("LDS") for _, t in ins[se[0]:se[1] + 1]),
                                      se[1] - se[0]))


def mix(body: list[tuple[int, str]]) -> collections.Counter:
    return collections.Counter(klass(opcode(t)) for _, t in body)


def find_tool(name: str) -> str:
    """ptxas / nvdisasm: from NVIDIA's wheels first (site-packages/nvidia/*/bin: the release of the
    NVVM that wrote the PTX; an older ptxas rejects its PTX version), then CUDA_HOME, then PATH."""
    roots = sorted((Path(sysconfig.get_paths()["purelib"]) / "nvidia").glob("*/bin"))
    roots += [Path(os.environ["CUDA_HOME"]) / "bin"] if os.environ.get("CUDA_HOME") else []
    for r in roots:
        if (r / name).exists():
            return str(r / name)
    hit = shutil.which(name)
    if hit:
        return hit
    raise SystemExit(f"{name} not found: run `make sass-tools` (NVIDIA's compiler wheels) or set CUDA_HOME")


def offline_device(sms: int, smem: int, cc: tuple[int, int]) -> None:
    """Make kernels/ plan and compile for a device that is not here: its SM count and shared
    memory for the plans, its compute capability for numba-cuda's device functions."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise SystemExit("unset NUMBA_ENABLE_CUDASIM: the simulator's kernels are not the device's")
    import numba.cuda.dispatcher as disp

    from vptq.kernels import _numba as nb

    nb.sm_count = lambda: sms
    nb.smem_optin = lambda: smem

    class _Device:
        compute_capability = cc

    disp.get_current_device = lambda: _Device()


def arg_types(args: list) -> tuple:
    import numba
    import torch

    def one(a):
        if isinstance(a, torch.Tensor):
            dt = numba.types.float16 if a.dtype == torch.float16 else numba.from_dtype(a.numpy().dtype)
            return numba.types.Array(dt, a.dim(), "C")
        return numba.typeof(a)

    return tuple(one(a) for a in args)


def compile_sass(kern, args: list, maxreg: int, cc: tuple[int, int], dump: Path | None, tag: str) -> dict:
    """PTX (numba-cuda) -> cubin (ptxas at the register cap) -> SASS; ptxas' figures and the listing."""
    from numba import cuda

    ptx, _ = cuda.compile(kern.py_func, arg_types(args), cc=cc, output="ptx", device=False, abi="numba")
    arch = f"sm_{cc[0]}{cc[1]}"
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        cmd = [find_tool("ptxas"), f"-arch={arch}", "-O3", "-v", str(src), "-o", str(cubin)]
        if maxreg:
            cmd.insert(3, f"--maxrregcount={maxreg}")
        info = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([find_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{tag}.ptx").write_text(ptx)
        (dump / f"{tag}.sass").write_text(sass)
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return dict(regs=int(regs.group(1)) if regs else -1, spill_st=int(spill.group(1)) if spill else -1,
                spill_ld=int(spill.group(2)) if spill else -1, sass=sass)


def hot_summary(res: dict, per: int, unit: str = "codes") -> str:
    """ptxas' figures, and the hot loop's instructions per `per` codes (one iteration) by class."""
    ins, labels = parse(res["sass"])
    head = f"regs {res['regs']}, spills {res['spill_st']}/{res['spill_ld']} B, {len(ins)} instructions"
    hl = hot_loop(ins, labels)
    if hl is None:
        return head + " | no loop found"
    body = ins[hl[0]:hl[1] + 1]
    parts = ", ".join(f"{k} {v / per:.2f}" for k, v in mix(body).most_common())
    return head + f"\n    hot loop: {len(body)} instructions per {per} {unit} = {len(body) / per:.2f} per code ({parts})"


def gemv_case(p, var: dict, cc, dump, tag: str) -> str:
    """The batch-1 row gemv of layout p with a --variants entry: its launch shape and profile."""
    import torch

    from bench.gemv_rows_probe import plans_for

    (plan,) = plans_for([p], var)
    if plan.path != "rows":
        return f"not the row kernel ({plan.path})"
    kern, _, _, static, scalars, _ = plan._launch_args(1, torch.float16)
    args = [torch.zeros(1, p.in_features, dtype=torch.float16), *static, torch.zeros(1, p.out_features), *scalars]
    res = compile_sass(kern, args, plan.rows_maxreg, cc, dump, tag)
    c = plan.rows_cfg
    return (f"gemv kc={c['kc']} lpr={c['lpr']} R={c['replicas']} threads={plan.rows_threads} maxreg={plan.rows_maxreg}"
            f"{' persist' if c['persist'] else ''}{' wide' if c['wide'] else ''}{' ilv' if c['ilv'] else ''} "
            f"ahead={c['ahead'] or 'default'} | " + hot_summary(res, c["cps"]))


DQ_KEYS = ("threads", "rb", "maxreg", "h2", "blocks", "grid", "ranges")


def dequant_case(p, var: dict, cc, dump, tag: str) -> str:
    """The row-staged dequantize to fp16 (kernels/dequant.py) with a variant of dequant2_config's
    knobs (DQ_KEYS, as bench/dequant_probe.py parses them): its launch shape and profile, per code =
    per column of a thread's row step."""
    import torch

    from vptq.kernels.dequant import dequant2_config, dequant2_launch
    from vptq.kernels.layout import column_map

    cfg = dequant2_config(p, torch.float16, **var)
    if cfg is None:
        return "not the row-staged kernel"
    kern, args, _ = dequant2_launch(p, torch.float16, column_map(p), cfg)
    res = compile_sass(kern, args, cfg["maxreg"], cc, dump, tag)
    return (f"dequant rb={cfg['rb']} threads={cfg['threads']} maxreg={cfg['maxreg']} cpt={cfg['cpt']}"
            f"{' h2' if cfg['h2'] else ''}{' smem-codebook' if cfg['cb_smem'] else ''} grid={cfg['grid']} | "
            + hot_summary(res, cfg["cpt"], "columns"))


def main() -> None:
    from bench.dequant_probe import parse_variant
    from bench.gemv_rows_probe import SHAPES, parse_variants

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="v5k1024,v4k256")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--kernels", default="gemv", help="comma list: gemv (the batch-1 row gemv), dequant")
    ap.add_argument("--variants", default="", help="gemv: as bench/gemv_rows_probe.py --variants ('' = the plan)")
    ap.add_argument("--dq-variants", default="", help=f"dequant: ';'-separated ','-lists of {'/'.join(DQ_KEYS)}=N")
    ap.add_argument("--cc", default="90", help="compute capability (90: H100/H200)")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the device the plans are made for")
    ap.add_argument("--smem-kib", type=int, default=227, help="shared memory a block may opt in to, KiB")
    ap.add_argument("--dump", default="", help="folder for each kernel's .ptx and .sass")
    a = ap.parse_args()
    cc = (int(a.cc[:-1]), int(a.cc[-1]))
    offline_device(a.sms, a.smem_kib * 1024, cc)
    from bench.kernel_table import FORMATS, make_layer

    cases = {"gemv": (gemv_case, parse_variants(a.variants)),
             "dequant": (dequant_case, [parse_variant(v) for v in a.dq_variants.split(";")])}
    bad = sorted({k for var in cases["dequant"][1] for k in var} - set(DQ_KEYS))
    if bad:
        raise SystemExit(f"--dq-variants: unknown key(s) {', '.join(bad)} (known: {', '.join(DQ_KEYS)})")
    kinds = a.kernels.split(",")
    if set(kinds) - set(cases):
        raise SystemExit(f"--kernels: one of {', '.join(cases)}")
    dump = Path(a.dump) if a.dump else None
    for fkey in a.formats.split(","):
        _, v, k, kr = FORMATS[fkey]
        for shape in a.shapes.split(","):
            m, n = (int(s) for s in shape.split("x"))
            p = make_layer(m, n, kr, seed=1, v=v, k=k, device="cpu")
            for kind in kinds:
                fn, variants = cases[kind]
                for i, var in enumerate(variants):
                    name = ",".join(f"{key}={val}" for key, val in var.items()) or "default"
                    out = fn(p, var, cc, dump, f"{kind}-{fkey}-{shape}-{i}")
                    print(f"{fkey} {shape} {name}: {out}", flush=True)


if __name__ == "__main__":
    main()
