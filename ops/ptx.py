"""The few PTX instructions Numba does not expose, as Numba intrinsics, with simulator twins.

Numba CUDA has no tensor-core MMA, no packed fp16x2 conversion and no 128-bit loads. Each is one
inline-PTX instruction here (ptxas schedules inline PTX like any other), typed on uint32 bit
patterns so that no fp16x2 type is needed in Numba:

- `mma_f16`: mma.sync.m16n8k16, fp16 A and B, fp32 C and D. One warp multiplies A [16 x 16] by
  B [16 x 8] and adds C. Lane l = 4 g + t holds (PTX ISA, "Matrix fragments for mma.m16n8k16"):
  a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9],
  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g], c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1];
  the lower column / row index sits in the lower 16 bits of a register.
- `pack_half2(lo, hi)`: two float32 rounded to fp16 (nearest even) in one register, `lo` in the
  low half.
- `half2_floats(h)`: the two fp16 halves of a register as float32 (lo, hi).
- `byte_floats(w)`: the four bytes of a register, low byte first, as float32 minus 128 (one `prmt` a
  byte: the byte becomes the low mantissa bits of 2^23, whose float is then 2^23 + byte, and one add).
  Stored biased by 128, int8 weights decode exactly with no integer-to-float conversion, which runs
  at a quarter of the FMA rate.
- `load_u32x4(a, i)`, `load_u32x2(a, i)`: a[i .. i+3] (a[i], a[i+1]) of a global uint32 array in one
  128-bit (64-bit) load, i a multiple of 4 (2), through the read-only path (`ld.global.nc`: the
  operand must not be written during the kernel).
- `load_f32x4(a, i)`: a[i .. i+3] of a global float32 array in one ordinary (coherent) 128-bit load,
  i a multiple of 4: for data other blocks of the same kernel wrote (behind an acquire).
- `wait_upstream()`, `release_dependents()`: programmatic dependent launch (sm_90+, `griddepcontrol`).
  A kernel launched behind a programmatic graph edge may start while the kernel before it still runs;
  `wait_upstream()` blocks until that kernel has completed and its writes are visible, so a kernel
  reads nothing another kernel writes (and writes nothing) before it. `release_dependents()` lets
  the next kernel's blocks launch (the hardware does so once every block has called it or exited).
  Both are no-ops in a kernel launched the ordinary way; `pdl_supported()` says whether this device
  has them (kernels are built with or without them).
- `fence_acq_rel()`: `fence.acq_rel.gpu` (SASS MEMBAR.ALL.GPU). Before a relaxed atomic it makes the
  thread's earlier writes, and those it saw through a barrier, visible to whoever reads the atomic's
  result (release); after one, it orders the thread's later reads after the writes that result
  stands for (acquire). Numba's `cuda.threadfence()` is `membar.gl`, a sequentially consistent fence
  (MEMBAR.SC.GPU), stronger and slower than that pattern needs.

Under the CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`) the same names are plain Python. The simulator
has no warp shuffles, so `mma_f16` exchanges fragments through a block-shared scratch array
(`MMA_SWAP` uint32 per thread, passed by the caller; the GPU ignores it) between two barriers:
every thread of the block must call it the same number of times, as a real mma needs the whole warp.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

SIMULATED = cuda.jit.__module__.startswith("numba.cuda.simulator")
MMA_SWAP = 6  # uint32 slots per thread in the simulator's fragment exchange


def pdl_supported() -> bool:
    """Whether kernels built now may use `wait_upstream` / `release_dependents` (compute capability
    9.0 or newer; never under the simulator, which launches kernels one after another anyway)."""
    return not SIMULATED and cuda.get_current_device().compute_capability >= (9, 0)


if SIMULATED:
    _LANE_G, _LANE_T = np.arange(32) // 4, np.arange(32) % 4

    def _halves(word) -> tuple[float, float]:
        pair = np.array([int(word) & 0xFFFFFFFF], np.uint32).view(np.float16)
        return float(pair[0]), float(pair[1])

    @cuda.jit(device=True)
    def half2_floats(h):
        lo, hi = _halves(h)
        return np.float32(lo), np.float32(hi)

    @cuda.jit(device=True)
    def pack_half2(lo, hi):
        return np.uint32(np.array([lo, hi], np.float32).astype(np.float16).view(np.uint32)[0])

    @cuda.jit(device=True)
    def byte_floats(w):
        b = np.array([w], np.uint32).view(np.uint8).astype(np.float32) - np.float32(128)
        return b[0], b[1], b[2], b[3]

    @cuda.jit(device=True)
    def load_u32x4(a, i):
        return np.uint32(a[i]), np.uint32(a[i + 1]), np.uint32(a[i + 2]), np.uint32(a[i + 3])

    @cuda.jit(device=True)
    def load_u32x2(a, i):
        return np.uint32(a[i]), np.uint32(a[i + 1])

    @cuda.jit(device=True)
    def load_f32x4(a, i):
        return np.float32(a[i]), np.float32(a[i + 1]), np.float32(a[i + 2]), np.float32(a[i + 3])

    @cuda.jit(device=True)
    def wait_upstream():
        pass

    @cuda.jit(device=True)
    def release_dependents():
        pass

    @cuda.jit(device=True)
    def fence_acq_rel():
        pass

    @cuda.jit(device=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, swap):
        tid = cuda.threadIdx.x
        base = tid - tid % 32  # the warp's first thread
        for k, v in enumerate((a0, a1, a2, a3, b0, b1)):
            swap[tid * MMA_SWAP + k] = v
        cuda.syncthreads()
        w = np.asarray(swap[base * MMA_SWAP:(base + 32) * MMA_SWAP]).view(np.float16).reshape(32, 2 * MMA_SWAP)
        A = np.zeros((16, 16))
        B = np.zeros((16, 8))
        g, t = _LANE_G[:, None], 2 * _LANE_T[:, None] + np.arange(2)  # fragment (row, column) per lane
        A[g, t], A[g + 8, t], A[g, t + 8], A[g + 8, t + 8] = w[:, 0:2], w[:, 2:4], w[:, 4:6], w[:, 6:8]
        B[t, g], B[t + 8, g] = w[:, 8:10], w[:, 10:12]
        cuda.syncthreads()  # the scratch is rewritten by the next call
        D = A @ B  # fp16 products are exact; summed in float64
        g, t = divmod(tid % 32, 4)
        return (np.float32(c0 + D[g, 2 * t]), np.float32(c1 + D[g, 2 * t + 1]),
                np.float32(c2 + D[g + 8, 2 * t]), np.float32(c3 + D[g + 8, 2 * t + 1]))
else:
    from llvmlite import ir
    from numba import types
    try:  # numba-cuda (the GPU image)
        from numba.cuda import cgutils
        from numba.cuda.extending import intrinsic
    except ImportError:  # Numba's built-in CUDA target
        from numba.core import cgutils
        from numba.core.extending import intrinsic

    _i32, _f32 = ir.IntType(32), ir.FloatType()

    def _asm(builder, ret, args, text: str, constraints: str, values, side_effect: bool = False):
        fn = ir.InlineAsm(ir.FunctionType(ret, args), text, constraints, side_effect=side_effect)
        return builder.call(fn, values)

    @intrinsic
    def mma_f16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, swap):
        sig = types.UniTuple(types.float32, 4)(types.uint32, types.uint32, types.uint32, types.uint32,
                                               types.uint32, types.uint32, types.float32, types.float32,
                                               types.float32, types.float32, swap)

        def codegen(context, builder, sig, args):
            d = _asm(builder, ir.LiteralStructType([_f32] * 4), [_i32] * 6 + [_f32] * 4,
                     "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                     "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", args[:10])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(d, i) for i in range(4)])

        return sig, codegen

    @intrinsic
    def pack_half2(typingctx, lo, hi):
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, sig, args):  # cvt's first source goes to the upper half
            return _asm(builder, _i32, [_f32, _f32], "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f",
                        [args[1], args[0]])

        return sig, codegen

    @intrinsic
    def half2_floats(typingctx, h):
        sig = types.UniTuple(types.float32, 2)(types.uint32)

        def codegen(context, builder, sig, args):
            halves = [builder.trunc(args[0], ir.IntType(16)),
                      builder.trunc(builder.lshr(args[0], ir.Constant(_i32, 16)), ir.IntType(16))]
            floats = [_asm(builder, _f32, [ir.IntType(16)], "cvt.f32.f16 $0, $1;", "=f,h", [v]) for v in halves]
            return context.make_tuple(builder, sig.return_type, floats)

        return sig, codegen

    BYTE_BIAS = np.float32((1 << 23) + 128)  # prmt's word as a float is 2^23 + byte; minus this: byte - 128

    def _byte_as_float(b: int):
        """An intrinsic: byte b of a register under 0x4B000000's upper bytes (2^23 as a float)."""
        @intrinsic
        def byte_word(typingctx, w):
            sig = types.float32(types.uint32)

            def codegen(context, builder, sig, args):
                return _asm(builder, _f32, [_i32], f"prmt.b32 $0, $1, 0x4B000000, {0x7650 | b};", "=f,r", args)

            return sig, codegen

        return byte_word

    _byte0, _byte1, _byte2, _byte3 = (_byte_as_float(b) for b in range(4))

    @cuda.jit(device=True)
    def byte_floats(w):
        return _byte0(w) - BYTE_BIAS, _byte1(w) - BYTE_BIAS, _byte2(w) - BYTE_BIAS, _byte3(w) - BYTE_BIAS

    def _load_vector(n: int, op: str, ty, reg: str):
        """An intrinsic loading a[i .. i + n - 1] of a global array in one n x 32-bit `op` (ty, reg: the
        elements' Numba type and inline-asm register class). A coherent load is marked as having side
        effects: LLVM would otherwise take it for a pure function of the address and could hoist it
        above the fence and barrier that make other blocks' writes visible."""
        regs = ", ".join(f"${k}" for k in range(n))
        llvm_ty = _i32 if reg == "r" else _f32

        @intrinsic
        def load(typingctx, a, i):
            sig = types.UniTuple(ty, n)(a, i)

            def codegen(context, builder, sig, args):
                ary = context.make_array(sig.args[0])(context, builder, value=args[0])
                idx = context.cast(builder, args[1], sig.args[1], types.intp)
                ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [idx], wraparound=False)
                d = _asm(builder, ir.LiteralStructType([llvm_ty] * n), [ptr.type],
                         f"{op}.v{n}.{'u32' if reg == 'r' else 'f32'} {{{regs}}}, [${n}];",
                         ",".join([f"={reg}"] * n) + ",l", [ptr], side_effect=".nc" not in op)
                return context.make_tuple(builder, sig.return_type, [builder.extract_value(d, k) for k in range(n)])

            return sig, codegen

        return load

    load_u32x4 = _load_vector(4, "ld.global.nc", types.uint32, "r")
    load_u32x2 = _load_vector(2, "ld.global.nc", types.uint32, "r")
    load_f32x4 = _load_vector(4, "ld.global", types.float32, "f")

    def _ordered(text: str):
        """An intrinsic issuing one ordering instruction (`griddepcontrol`, `fence`); a memory clobber
        keeps every load and store on its side of it."""
        @intrinsic
        def control(typingctx):
            def codegen(context, builder, sig, args):
                fn = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True)
                builder.call(fn, [])
                return context.get_dummy_value()

            return types.void(), codegen

        return control

    wait_upstream = _ordered("griddepcontrol.wait;")
    release_dependents = _ordered("griddepcontrol.launch_dependents;")
    fence_acq_rel = _ordered("fence.acq_rel.gpu;")
