"""GPU probe of VQuantLinear's routes above the fused gemv's 8 token rows (kernels/dispatch.py).

    python -u bench/rows_route_probe.py [--formats v5k1024,v5k1024r32] [--rows 9,16,32,64] [--out F.json]

For each layer shape (SmolLM2-135M's, Qwen2.5-0.5B's and Llama-2-7B's linears) and token-row count, on
random codes (bench/decode.py random_vq): fp16 F.linear, then the quantized layer through
`vq_linear_forward` on each route: "dequant" (the prepared DequantPlan + F.linear), "dequant_unprepared"
(kernels.dequant.dequantize + F.linear: the route before the plan), "chunked" (the fused gemv on
chunks of 8 rows). Each is checked against the dequantized weight's F.linear, then timed with
bench/kernel_table.py's time_device: device µs (CUDA-event median) and host µs (queueing a call while
the GPU is stalled). A serving loop pays about max(device, host) per call.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import parse_format, random_vq  # noqa: E402
from bench.kernel_table import time_device  # noqa: E402
from vptq.kernels import dispatch  # noqa: E402
from vptq.kernels.dequant import dequantize, dequantize_ref  # noqa: E402
from vptq.kernels.layout import PackedLayer  # noqa: E402

SHAPES = {  # (out, in)
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "qwen0.5b gate/up 4864x896": (4864, 896),
    "qwen0.5b down 896x4864": (896, 4864),
    "7B q/k/v/o 4096x4096": (4096, 4096),
    "7B gate/up 11008x4096": (11008, 4096),
}


def route_call(mod, x, route: str):
    if route == "fp16":
        w = mod._probe_dense
        return lambda: torch.nn.functional.linear(x, w)
    if route == "dequant_unprepared":
        p = PackedLayer.from_module(mod)
        return lambda: torch.nn.functional.linear(x, dequantize(p, x.dtype, checked=True))
    os.environ[dispatch.CHUNKED_ENV] = str(10**9 if route == "chunked" else 0)
    mod._kernel_state = None  # the variable is read when the layer's plans are built
    dispatch.vq_linear_forward(mod, x)
    return lambda: dispatch.vq_linear_forward(mod, x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="v5k1024,v5k1024r32")
    ap.add_argument("--rows", default="9,16,24,32,64")
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default all)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    names = list(SHAPES)
    if args.shapes:
        names = [names[int(i)] for i in args.shapes.split(",")]
    recs = []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print(f"{'format':11s} {'shape':28s} {'rows':>4s} " + " ".join(f"{r:>27s}" for r in
          ("fp16 dev/host", "dequant dev/host", "dequant_unprep dev/host", "chunked dev/host")), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    for fmt in args.formats.split(","):
        v, k, kr = parse_format(fmt)
        for name in names:
            m, n = SHAPES[name]
            lin = nn.Linear(n, m, bias=False)
            mod = random_vq(lin, v, k, device=dev, gen=gen, kr=kr)
            mod._probe_dense = dequantize_ref(PackedLayer.from_module(mod), torch.float32).half()
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, n, device=dev, generator=gen).half()
                ref = torch.nn.functional.linear(x.float(), mod._probe_dense.float())
                row = {"format": fmt, "shape": name, "m": m, "n": n, "rows": rows}
                with torch.no_grad():
                    for route in ("fp16", "dequant", "dequant_unprepared", "chunked"):
                        call = route_call(mod, x, route)
                        y = call()
                        err = float((y.float() - ref).abs().max() / ref.abs().max())
                        dev_us, host_us = time_device([call], iters=100)
                        row[route] = {"device_us": round(dev_us, 2), "host_us": round(host_us, 2),
                                      "rel_err": err}
                recs.append(row)
                print(f"{fmt:11s} {name:28s} {rows:4d} " + " ".join(
                    f"{row[r]['device_us']:12.1f}/{row[r]['host_us']:7.1f}{'!' if row[r]['rel_err'] > 5e-3 else ' '}"
                    + " " * 6 for r in ("fp16", "dequant", "dequant_unprepared", "chunked")), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "rows": recs}, indent=1))


if __name__ == "__main__":
    main()
