"""What a launch costs on the GPU before any work: the floor under every small-shape figure.

    python -u bench/launch_floor.py

bench/kernel_table.py times each call between two CUDA events, the GPU stalled until every call is
queued, so a timing holds the launch's device-side cost and the event records as well as the
kernel. On 4096x4096 that floor is a third of the fused gemv's time, and the issue's 2.5x would
leave it 2.8 µs of work. This prints the floor for kernels that do nothing, so that the small
shapes' figures can be read against it:

* torch: a 1-element add_ (torch's own launch path), and fp16 `x @ W.T` of 64x64;
* numba, one array argument, through numba's dispatcher and through a pre-marshalled launch
  (the path GemvPlan takes), and with 16 array arguments (a fused gemv passes about that many:
  parameter bytes);
* numba with 96 KiB of dynamic shared memory and the largest carveout (the row kernel's launch);
* each timed per call between events (bench/kernel_table.py's protocol), back to back with one event
  pair around 100 calls, and replayed from a captured CUDA graph (the decode loop's way).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gemv_rows_probe import time_graph  # noqa: E402
from bench.kernel_table import time_device  # noqa: E402
from vptq.kernels import _numba as nb  # noqa: E402
from vptq.kernels._numba import arr_args, core_stream  # noqa: E402


def back_to_back(call, n: int = 100) -> float:
    """Device µs per call for n calls between one event pair (no per-call events)."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(0.02 * 1.98e9))
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        call()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / n


def nop_kernels():
    from numba import float32

    c = nb.cuda()

    @c.jit
    def nop1(a):
        if c.threadIdx.x == 9999:
            a[0] = 1.0

    @c.jit
    def nop16(a, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14):
        if c.threadIdx.x == 9999:
            a[0] = b0[0] + b1[0] + b2[0] + b3[0] + b4[0] + b5[0] + b6[0] + b7[0] + b8[0] + b9[0] + b10[0] + b11[0] \
                + b12[0] + b13[0] + b14[0]

    @c.jit
    def nop_smem(a):
        s = c.shared.array(0, float32)
        if c.threadIdx.x == 9999:
            a[0] = s[5]

    return nop1, nop16, nop_smem


def fast_launch(disp, grid, threads, shmem, args):
    """A pre-marshalled launch of `disp` (compiled for args), as kernels/_numba.py's prepare_fast."""
    from numba.cuda._compat import CUDA_CORE_GE_1_0
    from numba.cuda.dispatcher import LaunchConfig, launch

    (kern,) = disp.overloads.values()
    flat = []
    for t in args:
        flat += arr_args(t)
    g3, b3 = (grid, 1, 1), (threads, 1, 1)
    cfg = (LaunchConfig(grid=g3, block=b3, shmem_size=shmem, is_cooperative=False) if CUDA_CORE_GE_1_0 else
           LaunchConfig(grid=g3, block=b3, shmem_size=shmem, cooperative_launch=False))
    fn = kern._codelibrary.get_cufunc().kernel

    def call():
        launch(core_stream(torch.cuda.current_stream().cuda_stream), cfg, fn, *flat)

    return call


def main() -> None:
    dev = "cuda"
    t = torch.zeros(1, device=dev)
    x = torch.randn(1, 64, device=dev, dtype=torch.float16)
    w = torch.randn(64, 64, device=dev, dtype=torch.float16)
    ts = [torch.zeros(1, device=dev) for _ in range(15)]
    s = nb.stream_for(t)
    arr, arrs = nb.as_array(t), [nb.as_array(u) for u in ts]
    nop1, nop16, nop_smem = nop_kernels()
    smem = 96 * 1024
    nb.launch(nop_smem, 132, 256, s, t, shmem=smem)  # compiles, opts in to the shared memory
    torch.cuda.synchronize()
    cases = {
        "torch add_ (1 element)": lambda: t.add_(1.0),
        "torch fp16 x @ W.T 64x64": lambda: x @ w.t(),
        # the stream looked up per call: a graph capture runs on a side stream
        "numba nop, dispatcher, 1 array": lambda: nop1[132, 256, nb.stream_for(t)](arr),
        "numba nop, pre-marshalled, 1 array": None,
        "numba nop, pre-marshalled, 16 arrays": None,
        "numba nop, pre-marshalled, 96 KiB dynamic smem": None,
    }
    nop1[132, 256, s](arr)
    nop16[132, 256, s](arr, *arrs)
    torch.cuda.synchronize()
    cases["numba nop, pre-marshalled, 1 array"] = fast_launch(nop1, 132, 256, 0, [t])
    cases["numba nop, pre-marshalled, 16 arrays"] = fast_launch(nop16, 132, 256, 0, [t, *ts])
    cases["numba nop, pre-marshalled, 96 KiB dynamic smem"] = fast_launch(nop_smem, 132, 256, smem, [t])
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print("| launch | per-call events µs | back to back µs | CUDA graph µs |", flush=True)
    print("|---|---|---|---|", flush=True)
    for name, call in cases.items():
        ev = time_device([call], iters=200)[0]
        b2b = back_to_back(call)
        try:
            gr = f"{time_graph([call] * 50):.2f}"
        except Exception as e:  # a launch path that cannot be captured
            gr = f"n/a ({type(e).__name__})"
        print(f"| {name} | {ev:.2f} | {b2b:.2f} | {gr} |", flush=True)


if __name__ == "__main__":
    main()
