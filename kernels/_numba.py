"""The one place that knows numba's quirks; every kernel module imports numba through here.

* numpy >= 2.4 removed `np.row_stack`, which numba-cuda still references at import time:
  the alias is put back before `numba.cuda` is imported.
* numba is optional for CPU users of `vptq`: nothing here is imported until a kernel is used.
* torch CUDA tensors reach kernels without copies through `__cuda_array_interface__`, without
  numba's implicit stream synchronisation, and kernels launch on torch's current stream.
* Under the simulator (`NUMBA_ENABLE_CUDASIM=1`, how CI runs the kernels without a GPU) CPU
  tensors are passed as numpy views of the same memory, so launchers are identical in both modes.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch


def simulator_enabled() -> bool:
    """True when numba runs CUDA kernels in its Python simulator."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def cuda():
    """`numba.cuda`, imported once, after the numpy 2.x shim. Raises ImportError without numba."""
    import numpy as np

    if not hasattr(np, "row_stack"):  # removed in numpy 2.4; numba-cuda still names it
        np.row_stack = np.vstack
    import numba.core.config as cfg

    if simulator_enabled() and not cfg.ENABLE_CUDASIM:  # env set after numba was first imported
        cfg.reload_config()
    from numba import cuda as _cuda

    return _cuda


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Can kernels run here at all (real GPU, or the simulator)?"""
    try:
        c = cuda()
    except ImportError:
        return False
    if simulator_enabled():
        return True
    try:
        return bool(c.is_available())
    except Exception:  # driver missing or broken: use the torch path
        return False


def use_kernels(*tensors: torch.Tensor | None) -> bool:
    """The dispatch rule: numba kernels when every tensor is on a CUDA device and numba works.

    CPU tensors always take the torch reference, also under the simulator (tests call the
    kernels directly there), so setting NUMBA_ENABLE_CUDASIM never slows other CPU code.
    """
    ts = [t for t in tensors if t is not None]
    if not ts or simulator_enabled():
        return False
    return all(t.is_cuda for t in ts) and available()


def as_array(t: torch.Tensor) -> Any:
    """Zero-copy device view of a torch tensor (numpy view of it under the simulator)."""
    if t.is_cuda:
        # sync=False: ordering is guaranteed by launching on torch's current stream instead
        return cuda().from_cuda_array_interface(t.__cuda_array_interface__, owner=t, sync=False)
    if simulator_enabled():
        return t.numpy()
    raise ValueError(f"tensor on {t.device} cannot be passed to a CUDA kernel")


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int):
    return cuda().default_stream() if ptr == 0 else cuda().external_stream(ptr)


def stream_for(t: torch.Tensor) -> Any:
    """numba stream wrapping torch's current stream on t's device (0 under the simulator)."""
    if not t.is_cuda:
        return 0
    return _external_stream(torch.cuda.current_stream(t.device).cuda_stream)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_1d(n: int, threads: int) -> int:
    """Blocks needed to give n items one thread each (at least one block)."""
    return max(1, cdiv(n, threads))


def launch(kernel, grid, block, stream, *args) -> None:
    """kernel[grid, block, stream](*args); torch tensors become zero-copy device arrays."""
    arrs = [as_array(a) if isinstance(a, torch.Tensor) else a for a in args]
    if simulator_enabled():
        kernel[grid, block](*arrs)
    else:
        kernel[grid, block, stream](*arrs)


def dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-element stand-in for an absent optional tensor (kernels are specialised not to read it)."""
    return torch.zeros(1, dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def half_bits_to_float():
    """Device function: the low 16 bits of an integer, read as an fp16 value, widened to float32.

    On the GPU this is one `cvt.f32.f16` (inline PTX), so a codebook can be fetched as 64-bit
    words (four fp16 values per load) instead of one 2-byte load per value.
    """
    c = cuda()
    if simulator_enabled():
        import numpy as np

        @c.jit(device=True)
        def h2f(bits):
            return np.float32(np.uint16(int(bits) & 0xFFFF).view(np.float16))

        return h2f

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _cvt(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            (b,) = args
            width = b.type.width
            if width > 16:
                b = builder.trunc(b, ir.IntType(16))
            elif width < 16:
                b = builder.zext(b, ir.IntType(16))
            fnty = ir.FunctionType(ir.FloatType(), [ir.IntType(16)])
            return builder.call(ir.InlineAsm(fnty, "cvt.f32.f16 $0, $1;", "=f,h"), [b])

        return types.float32(bits), codegen

    @c.jit(device=True, inline=True)
    def h2f(bits):
        return _cvt(bits)

    return h2f


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def log2i(n: int) -> int:
    return int(math.log2(n))


@functools.lru_cache(maxsize=1)
def load_128():
    """Device function ld128(arr, i) -> (arr.flat[i], arr.flat[i + 1]) for a C-contiguous int64 array.

    On the GPU one `ld.global.v2.u64` (inline PTX): a 16-byte centroid (v=8 fp16) costs one load
    instruction instead of two, which halves the L1 wavefronts of the random codebook gathers
    (the limit of the fused gemv). i must be even and the array 16-byte aligned (torch allocations
    are 256-byte aligned).
    """
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def ld128(arr, i):
            a = arr.reshape(-1)
            return a[i], a[i + 1]

        return ld128

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _ld(typingctx, arr, i):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(i, types.Integer)):
            return None
        sig = types.UniTuple(types.int64, 2)(arr, i)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            idx = args[1]
            if idx.type.width != 64:
                idx = builder.sext(idx, ir.IntType(64))
            addr = builder.ptrtoint(builder.gep(ary.data, [idx]), ir.IntType(64))
            i64 = ir.IntType(64)
            fnty = ir.FunctionType(ir.LiteralStructType([i64, i64]), [i64])
            res = builder.call(ir.InlineAsm(fnty, "ld.global.v2.u64 {$0, $1}, [$2];", "=l,=l,l"), [addr])
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(res, 0), builder.extract_value(res, 1)])

        return sig, codegen

    @c.jit(device=True, inline=True)
    def ld128(arr, i):
        return _ld(arr, i)

    return ld128
