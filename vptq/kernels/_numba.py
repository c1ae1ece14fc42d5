"""The one place that knows numba's quirks; every kernel module imports numba through here.

* numpy >= 2.4 removed `np.row_stack`, which numba-cuda still references at import time:
  the alias is put back before `numba.cuda` is imported.
* numba is optional for CPU users of `vptq`: nothing here is imported until a kernel is used.
* torch CUDA tensors reach kernels without copies through `__cuda_array_interface__`, without
  numba's implicit stream synchronisation, and kernels launch on torch's current stream.
* Under the simulator (`NUMBA_ENABLE_CUDASIM=1`, how CI runs the kernels without a GPU) CPU
  tensors are passed as numpy views of the same memory, so launchers are identical in both modes.
* The simulator's `cuda.shared.array` looks up a block's array and creates it when missing
  without a lock, so two of its threads could each create one and no longer share memory (the
  kernel then reads a tile it never loaded): `_lock_simulator_shared_arrays` serialises it.
* Pre-marshalled launches (`prepare_fast`, `launch_fast`) use numba's dispatcher internals; when
  those move, `prepare_fast` returns None and the plans keep the dispatcher's path.
"""

from __future__ import annotations

import ctypes
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

    if cfg.ENABLE_CUDASIM:
        _lock_simulator_shared_arrays()
    return _cuda


def _lock_simulator_shared_arrays() -> None:
    """Make the simulator's shared-array get-or-create atomic across a block's threads.

    Its `FakeCUDAShared.array` does `get`, then `np.empty` + store when missing: a thread switch
    between the two gives two threads different arrays (seen in CI as wrong nearest-centroid
    indices, more often with a short GIL switch interval). The simulator picks the array by its
    caller's file and line, which a wrapper would hide, so the original body is run under a lock
    with the caller frame it expects.
    """
    import sys
    import threading
    import traceback

    import numpy as np
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_vptq_locked", False):
        return
    original = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / errors: nothing to race
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe(1), limit=1)[-1][0:2]  # the kernel's line
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    shared.array = array
    shared._vptq_locked = True


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


STATIC_SMEM = 48 * 1024  # shared memory a block gets without opting in


def launch(kernel, grid, block, stream, *args, shmem: int = 0) -> None:
    """kernel[grid, block, stream, shmem](*args); torch tensors become zero-copy device arrays.

    shmem = bytes of dynamic shared memory; above 48 KiB the compiled kernel is first allowed
    to take more (`allow_dynamic_smem`).
    """
    arrs = [as_array(a) if isinstance(a, torch.Tensor) else a for a in args]
    if simulator_enabled():
        kernel[grid, block, 0, shmem](*arrs)
        return
    if shmem > STATIC_SMEM:
        allow_dynamic_smem(kernel, arrs, shmem)
    kernel[grid, block, stream, shmem](*arrs)


_DYN_SMEM: dict[tuple, int] = {}


def smem_optin() -> int:
    """Largest shared memory one block may opt in to on the current device (H100: 227 KiB)."""
    if simulator_enabled():
        return 227 * 1024
    return int(cuda().get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)


def sm_count() -> int:
    """SMs of the current device (the simulator: an H100's 132)."""
    if simulator_enabled():
        return 132
    return int(cuda().get_current_device().MULTIPROCESSOR_COUNT)


def allow_dynamic_smem(kernel, arrs, shmem: int) -> None:
    """Compile `kernel` for these arguments and raise its dynamic shared memory limit (and prefer
    the largest shared-memory carveout) so a launch with `shmem` bytes (> 48 KiB) is accepted."""
    key = (id(kernel), tuple((getattr(a, "dtype", type(a)), getattr(a, "ndim", 0)) for a in arrs))
    if _DYN_SMEM.get(key, 0) >= shmem:
        return
    if shmem > smem_optin():
        raise ValueError(f"shared memory: {shmem} bytes exceed the device's {smem_optin()} per block")
    from numba.cuda.cudadrv.driver import binding, driver

    kern = kernel._compile_for_args(*arrs)
    cufunc = kern._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, smem_optin() - cufunc.attrs.shared, cufunc.handle, cufunc.device.id)
    cufunc.set_shared_memory_carveout(100)
    _DYN_SMEM[key] = smem_optin() - cufunc.attrs.shared


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


@functools.lru_cache(maxsize=1)
def store_128():
    """Device function st128(arr, i, lo, hi): arr.flat[i], arr.flat[i + 1] = lo, hi for a C-contiguous
    int64 array, as one `st.global.v2.u64` (a 16-byte store). i even, 16-byte aligned array."""
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def st128(arr, i, lo, hi):
            a = arr.reshape(-1)
            a[i] = wrap64(lo)
            a[i + 1] = wrap64(hi)

        return st128

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _st(typingctx, arr, i, lo, hi):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(i, types.Integer)
                and isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
            return None
        sig = types.void(arr, i, lo, hi)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            i64 = ir.IntType(64)
            idx = args[1]
            if idx.type.width != 64:
                idx = builder.sext(idx, i64)
            vals = []
            for v in args[2:]:
                vals.append(builder.sext(v, i64) if v.type.width < 64 else v)
            addr = builder.ptrtoint(builder.gep(ary.data, [idx]), i64)
            fnty = ir.FunctionType(ir.VoidType(), [i64, i64, i64])
            builder.call(ir.InlineAsm(fnty, "st.global.v2.u64 [$0], {$1, $2};", "l,l,l", side_effect=True),
                         [addr, *vals])
            return context.get_dummy_value()

        return sig, codegen

    @c.jit(device=True, forceinline=True)
    def st128(arr, i, lo, hi):
        _st(arr, i, lo, hi)

    return st128


def wrap64(v) -> int:
    """Python/numpy integer -> the int64 with the same low 64 bits (simulator only)."""
    v = int(v) & 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= (1 << 63) else v


@functools.lru_cache(maxsize=1)
def float_to_half_bits():
    """Device function: float32 -> the 16 bits of its fp16 rounding (round to nearest even), as an
    integer 0..65535 (one `cvt.rn.f16.f32`)."""
    c = cuda()
    if simulator_enabled():
        import numpy as np

        @c.jit(device=True)
        def f2h(x):
            return int(np.float16(np.float32(x)).view(np.uint16))

        return f2h

    return _float_asm("cvt.rn.f16.f32 $0, $1;", 16)


def _float_asm(asm: str, bits: int):
    """Device function (GPU): one float (narrowed to float32) -> the integer result of the inline PTX
    `asm` ($0 = result of `bits` bits, $1 = the float); 16-bit results are zero-extended to int64."""
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    out = types.int64 if bits == 16 else types.int32

    @intrinsic
    def _cvt(typingctx, x):
        if not isinstance(x, types.Float):
            return None

        def codegen(context, builder, sig, args):
            (a,) = args
            if a.type != ir.FloatType():
                a = builder.fptrunc(a, ir.FloatType())
            fnty = ir.FunctionType(ir.IntType(bits), [ir.FloatType()])
            r = builder.call(ir.InlineAsm(fnty, asm, ("=h" if bits == 16 else "=r") + ",f"), [a])
            return builder.zext(r, ir.IntType(64)) if bits == 16 else r

        return out(x), codegen

    @cuda().jit(device=True, forceinline=True)
    def cvt(x):
        return _cvt(x)

    return cvt


def compile_source(src: str, name: str, env: dict, tag: str):
    """exec generated kernel source (registered with linecache so tracebacks show it) and return
    the function `name` defined in it. Generated code keeps per-code work in scalar variables,
    fully unrolled, so nothing lands in local memory."""
    import linecache

    fname = f"<kernels-generated-{tag}>"
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    ns = dict(env)
    exec(compile(src, fname, "exec"), ns)
    return ns[name]


def _half_bits(v) -> int:
    import numpy as np

    return int(np.float16(v).view(np.uint16))


def _wrap32(v) -> int:
    v = int(v) & 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


@functools.lru_cache(maxsize=1)
def half2_fma_pair():
    """Device function hfma2x2(word, xh, a0, a1) -> (a0', a1'): the four fp16 values of the 64-bit
    `word` (a v=4 slice of a centroid) times the fp16 pair `xh` (x' twice), added to two packed
    half2 accumulators (int32 bits): two `fma.rn.f16x2`. Why: fp32 math costs four conversions and
    four FMAs per centroid word and left the row-per-lane gemv issue-bound; callers add the half2
    sums into fp32 every few codes, so only short runs are summed in fp16."""
    c = cuda()
    if simulator_enabled():
        import numpy as np

        def one(a, b, acc):
            out = 0
            for s in (0, 16):
                fa, fb, fc = (np.uint16((int(t) >> s) & 0xFFFF).view(np.float16) for t in (a, b, acc))
                out |= _half_bits(np.float32(fa) * np.float32(fb) + np.float32(fc)) << s
            return _wrap32(out)

        @c.jit(device=True)
        def hfma2x2(word, xh, a0, a1):
            w = int(word) & 0xFFFFFFFFFFFFFFFF
            return one(w & 0xFFFFFFFF, xh, a0), one(w >> 32, xh, a1)

        return hfma2x2

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _fma(typingctx, word, xh, a0, a1):
        if not all(isinstance(t, types.Integer) for t in (word, xh, a0, a1)):
            return None
        sig = types.UniTuple(types.int32, 2)(word, xh, a0, a1)

        def codegen(context, builder, sig, args):
            i32, i64 = ir.IntType(32), ir.IntType(64)

            def cast(v, t):
                w = v.type.width
                return v if w == t.width else (builder.trunc(v, t) if w > t.width else builder.sext(v, t))

            w, x, p, q = cast(args[0], i64), cast(args[1], i32), cast(args[2], i32), cast(args[3], i32)
            fnty = ir.FunctionType(ir.LiteralStructType([i32, i32]), [i64, i32, i32, i32])
            asm = ("{ .reg .b32 lo, hi; mov.b64 {lo, hi}, $2; "
                   "fma.rn.f16x2 $0, lo, $3, $4; fma.rn.f16x2 $1, hi, $3, $5; }")
            res = builder.call(ir.InlineAsm(fnty, asm, "=r,=r,l,r,r,r"), [w, x, p, q])
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(res, 0), builder.extract_value(res, 1)])

        return sig, codegen

    @c.jit(device=True, forceinline=True)
    def hfma2x2(word, xh, a0, a1):
        return _fma(word, xh, a0, a1)

    return hfma2x2


@functools.lru_cache(maxsize=1)
def float_to_half2():
    """Device function: float32 -> int32 bits of the fp16 pair (x, x) (round to nearest even)."""
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def f2h2(x):
            h = _half_bits(x)
            return _wrap32(h | (h << 16))

        return f2h2

    return _float_asm("{ .reg .b16 h; cvt.rn.f16.f32 h, $1; mov.b32 $0, {h, h}; }", 32)


@functools.lru_cache(maxsize=4)
def warp_allsum(warp: int):
    """Device function: the sum of a float over the warp, in every lane (xor shuffles). The
    simulator runs every thread as its own warp (warp = 1): the value itself."""
    c = cuda()

    @c.jit(device=True)
    def allsum(val):
        if warp > 1:
            off = warp // 2
            while off > 0:
                val += c.shfl_xor_sync(0xFFFFFFFF, val, off)
                off //= 2
        return val

    return allsum


def _asm_i32(asm: str, nargs: int):
    """Device function (GPU): inline PTX `asm` on `nargs` 32-bit integer operands ($1..$n; wider
    integers are truncated to their low 32 bits) -> one 32-bit result ($0), as int32."""
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i32 = ir.IntType(32)

    def cast(builder, v):
        w = v.type.width
        return v if w == 32 else (builder.trunc(v, i32) if w > 32 else builder.sext(v, i32))

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(i32, [i32] * nargs)
        return builder.call(ir.InlineAsm(fnty, asm, ",".join(["=r"] + ["r"] * nargs)),
                            [cast(builder, a) for a in args])

    if nargs == 2:
        @intrinsic
        def _op(typingctx, a, b):
            if all(isinstance(t, types.Integer) for t in (a, b)):
                return types.int32(a, b), codegen

        @cuda().jit(device=True, forceinline=True)
        def op(a, b):
            return _op(a, b)
    else:
        @intrinsic
        def _op(typingctx, a, b, c):
            if all(isinstance(t, types.Integer) for t in (a, b, c)):
                return types.int32(a, b, c), codegen

        @cuda().jit(device=True, forceinline=True)
        def op(a, b, c):
            return _op(a, b, c)
    return op


def _sim_halves(w) -> tuple:
    import numpy as np

    w = int(w) & 0xFFFFFFFF
    return tuple(np.float64(np.uint16((w >> s) & 0xFFFF).view(np.float16)) for s in (0, 16))


def _sim_pack(lo, hi) -> int:
    return _wrap32(_half_bits(lo) | (_half_bits(hi) << 16))


@functools.lru_cache(maxsize=1)
def half2_ops():
    """Device functions on fp16 pairs held as int32 bits (low half = first value):

    * hpair(a, b, sel): the pair (half of a, half of b) as one `prmt.b32` (sel 0x5410: low halves,
      0x7632: high halves, 0x7610: low of a + high of b, 0x5432: high of a + low of b);
    * hadd2(p, q): p + q (`add.rn.f16x2`, rounded once per value);
    * hfma2(p, s, b): p * s + b (`fma.rn.f16x2`, rounded once per value).

    Why: the dequantize kernel's output is fp16 pairs of neighbouring columns; building them from
    the centroid words and scaling them in half2 is 2 instructions per two values, against ~10 for
    fp16 -> fp32, fp32 math and fp32 -> fp16 per value."""
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def hpair(a, b, sel):
            ha = (int(a) & 0xFFFFFFFF) >> (16 if (int(sel) & 0xFF) == 0x32 else 0)
            hb = (int(b) & 0xFFFFFFFF) >> (16 if (int(sel) >> 8) & 0xFF == 0x76 else 0)
            return _wrap32((ha & 0xFFFF) | ((hb & 0xFFFF) << 16))

        @c.jit(device=True)
        def hadd2(p, q):
            (a0, a1), (b0, b1) = _sim_halves(p), _sim_halves(q)
            return _sim_pack(a0 + b0, a1 + b1)

        @c.jit(device=True)
        def hfma2(p, s, b):
            (a0, a1), (s0, s1), (b0, b1) = _sim_halves(p), _sim_halves(s), _sim_halves(b)
            return _sim_pack(a0 * s0 + b0, a1 * s1 + b1)

        return hpair, hadd2, hfma2

    return (_asm_i32("prmt.b32 $0, $1, $2, $3;", 3), _asm_i32("add.rn.f16x2 $0, $1, $2;", 2),
            _asm_i32("fma.rn.f16x2 $0, $1, $2, $3;", 3))


@functools.lru_cache(maxsize=1)
def store_128w():
    """Device function st128w(arr, i, a, b, c, d): the 16 bytes at arr.flat[i] (C-contiguous int64
    array, i even) = four int32 words a, b, c, d (low address first): one `st.global.v4.b32`."""
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def st128w(arr, i, a, b, d, e):
            f = arr.reshape(-1)
            f[i] = wrap64((int(a) & 0xFFFFFFFF) | ((int(b) & 0xFFFFFFFF) << 32))
            f[i + 1] = wrap64((int(d) & 0xFFFFFFFF) | ((int(e) & 0xFFFFFFFF) << 32))

        return st128w

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _st(typingctx, arr, i, a, b, d, e):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64
                and all(isinstance(t, types.Integer) for t in (i, a, b, d, e))):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            i64, i32 = ir.IntType(64), ir.IntType(32)
            idx = args[1] if args[1].type.width == 64 else builder.sext(args[1], i64)
            vals = [v if v.type.width == 32 else (builder.trunc(v, i32) if v.type.width > 32 else builder.sext(v, i32))
                    for v in args[2:]]
            addr = builder.ptrtoint(builder.gep(ary.data, [idx]), i64)
            fnty = ir.FunctionType(ir.VoidType(), [i64, i32, i32, i32, i32])
            builder.call(ir.InlineAsm(fnty, "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r",
                                      side_effect=True), [addr, *vals])
            return context.get_dummy_value()

        return types.void(arr, i, a, b, d, e), codegen

    @c.jit(device=True, forceinline=True)
    def st128w(arr, i, a, b, d, e):
        _st(arr, i, a, b, d, e)

    return st128w


@functools.lru_cache(maxsize=1)
def load_64():
    """Device function ld64(arr, i) -> arr.flat[i] for a C-contiguous int64 array of any rank (one
    `ld.global.u64`; the row kernel reads 10-bit code steps, 40 bytes, as five of them)."""
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def ld64(arr, i):
            return arr.reshape(-1)[i]

        return ld64

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _ld(typingctx, arr, i):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            i64 = ir.IntType(64)
            idx = args[1] if args[1].type.width == 64 else builder.sext(args[1], i64)
            addr = builder.ptrtoint(builder.gep(ary.data, [idx]), i64)
            fnty = ir.FunctionType(i64, [i64])
            return builder.call(ir.InlineAsm(fnty, "ld.global.u64 $0, [$1];", "=l,l"), [addr])

        return types.int64(arr, i), codegen

    @c.jit(device=True, forceinline=True)
    def ld64(arr, i):
        return _ld(arr, i)

    return ld64


@functools.lru_cache(maxsize=1)
def shared_128_at():
    """(sbase, lds128at): sbase(arr) -> the 32-bit shared-window address of a shared array (once per
    kernel); lds128at(arr, base, off) -> the two int64 words at byte offset `off` (16-byte aligned)
    of that array, one `ld.shared.v2.u64` at the 32-bit address base + off. Why one instruction:
    two 8-byte indexings, unless the compiler merges them, are two loads, each a half-warp
    wavefront, and the row kernel's 16-byte centroid slots (v = 5) would then conflict in pairs.
    Why a 32-bit address: a generic 64-bit one costs every load a 64-bit address sum and a move
    (the row kernel's 10-bit codes: 2 of its 14 instructions per code, bench/sass.py). The
    simulator reads arr[(base + off) // 8] and the next word (base 0)."""
    c = cuda()
    if simulator_enabled():
        @c.jit(device=True)
        def sbase(arr):
            return 0

        @c.jit(device=True)
        def lds128at(arr, base, off):
            i = (base + off) // 8
            return arr[i], arr[i + 1]

        return sbase, lds128at

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i32, i64 = ir.IntType(32), ir.IntType(64)

    @intrinsic
    def _sbase(typingctx, arr):
        if not isinstance(arr, types.Array):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            addr = builder.ptrtoint(ary.data, i64)
            fnty = ir.FunctionType(i32, [i64])
            asm = "{ .reg .u64 t; cvta.to.shared.u64 t, $1; cvt.u32.u64 $0, t; }"
            return builder.call(ir.InlineAsm(fnty, asm, "=r,l"), [addr])

        return types.uint32(arr), codegen

    @intrinsic
    def _lds(typingctx, base, off):
        if not (isinstance(base, types.Integer) and isinstance(off, types.Integer)):
            return None
        sig = types.UniTuple(types.int64, 2)(base, off)

        def codegen(context, builder, sig, args):
            b, o = (builder.trunc(a, i32) if a.type.width > 32 else a for a in args)
            fnty = ir.FunctionType(ir.LiteralStructType([i64, i64]), [i32])
            # side effects: never moved above a barrier (the slots are filled before it)
            res = builder.call(ir.InlineAsm(fnty, "ld.shared.v2.u64 {$0, $1}, [$2];", "=l,=l,r", side_effect=True),
                               [builder.add(b, o)])
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(res, 0), builder.extract_value(res, 1)])

        return sig, codegen

    @c.jit(device=True, forceinline=True)
    def sbase(arr):
        return _sbase(arr)

    @c.jit(device=True, forceinline=True)
    def lds128at(arr, base, off):
        return _lds(base, off)

    return sbase, lds128at


# ------------------------------------------------------------------ pre-marshalled launches
# A plan (gemv.py GemvPlan, gemv_group.py RowsGroupPlan) marshals its constant arguments once; a
# call then passes only x and y straight to the driver, past numba's dispatcher (`host_us` in
# bench/results/kernels.md).
def arr_args(t: torch.Tensor) -> list:
    """A torch tensor as numba's kernel ABI for an array argument (meminfo, parent, size, ...)."""
    it = t.element_size()
    return [0, 0, t.numel(), it, t.data_ptr(), *t.shape, *(s * it for s in t.stride())]


@functools.lru_cache(maxsize=64)
def core_stream(ptr: int):
    """cuda.core stream object for a raw CUDA stream handle (torch's current stream)."""
    from numba.cuda.cudadrv import driver

    return driver._to_core_stream(_external_stream(ptr))


def _driver_launch(disp, grid, threads: int, shmem: int) -> tuple:
    """(numba's driver launch, launch config, CUfunction) of a dispatcher compiled for one signature."""
    from numba.cuda._compat import CUDA_CORE_GE_1_0
    from numba.cuda.dispatcher import LaunchConfig, launch

    (kern,) = disp.overloads.values()
    grid3, block3 = (*grid, 1), (threads, 1, 1)
    if CUDA_CORE_GE_1_0:
        cfg = LaunchConfig(grid=grid3, block=block3, shmem_size=shmem, is_cooperative=False)
    else:
        cfg = LaunchConfig(grid=grid3, block=block3, shmem_size=shmem, cooperative_launch=False)
    return launch, cfg, kern._codelibrary.get_cufunc().kernel


def prepare_fast(disp, grid, threads: int, shmem: int, static_t: list, scalars_i: list):
    """Marshal a launch's constant arguments once (None when numba's internals moved: the caller
    keeps the slower dispatcher path). The call then passes x, y and these to `launch_fast`."""
    try:
        launch, cfg, kern = _driver_launch(disp, grid, threads, shmem)
        static = []
        for t in static_t:
            static += arr_args(t)
        return (launch, cfg, kern, static, [ctypes.c_int64(s) for s in scalars_i])
    except Exception:  # numba internals moved: keep the (slower) dispatcher path
        return None


def prepare_tail(disp, grid, threads: int, shmem: int, head: list, tail: list):
    """Marshal every argument but the last few tensors (`launch_tail` passes those): head = tensors
    and ints before them, tail = ints after them. None when numba's internals moved. The caller
    keeps head's tensors alive (only their pointers are kept here)."""
    try:
        launch, cfg, kern = _driver_launch(disp, grid, threads, shmem)
        flat = []
        for a in head:
            flat += arr_args(a) if isinstance(a, torch.Tensor) else [ctypes.c_int64(a)]
        return (launch, cfg, kern, flat, [ctypes.c_int64(s) for s in tail])
    except Exception:  # numba internals moved: keep the (slower) dispatcher path
        return None


def launch_tail(rec: tuple, *tensors: torch.Tensor) -> None:
    """Launch a `prepare_tail` record on torch's current stream with these last tensor arguments."""
    launch, cfg, kern, head, tail = rec
    flat = []
    for t in tensors:
        flat += arr_args(t)
    launch(core_stream(torch.cuda.current_stream(tensors[0].device).cuda_stream), cfg, kern, *head, *flat, *tail)


def launch_fast(fast: tuple, x: torch.Tensor, y: torch.Tensor) -> None:
    """Launch a `prepare_fast` record on torch's current stream: only x and y are marshalled."""
    launch, cfg, kern, static, scalars = fast
    stream = core_stream(torch.cuda.current_stream(x.device).cuda_stream)
    launch(stream, cfg, kern, *arr_args(x), *static, *arr_args(y), *scalars)
