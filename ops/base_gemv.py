"""Base GEMV op: y = deq(Q) @ (x * act_scale) for one token, 3- or 4-bit weights (docs/FORMATS.md).

`base_gemv_reference` is the obviously-correct CPU version (torch, float32). `base_gemv_cuda` / `BaseGemv`
is the Numba CUDA kernel for batch 1: fp16 activations in, fp16 out, float32 accumulation.

Where the time goes on the GPU (DESIGN.md §6): a batch-1 GEMV must stream the packed weights at HBM speed,
and plain Numba is bound by instructions long before that. The kernel therefore
- gives each warp R rows that share the activations held in registers (one activation load per R rows);
- stages x * act_scale once per block in shared memory as float32, laid out so that lane l of step s
  reads its 16 (4-bit) or 32 (3-bit) inputs conflict-free: index (s * UNIT + j) * 33 + l;
- turns a code into a float without a conversion instruction: the code is masked into the mantissa of
  1.0, giving f = 1 + code / M, and folds both that offset and the zero point through the sum S of the
  unit's activations: sum_j (q_j - z) s x_j = s * (M * sum_j f_j x_j - (M + z) * S). At 4 bits one
  shift places two nibbles at once (mantissa bits 15..18 and 19..22: M = 256 and 16, the staged
  inputs carry M_j); 1.0 arrives as a kernel argument so that the mask-and-or is one LOP3;
- loads weights 64 bits a lane (4-bit) and issues all R rows' loads before using any; rows of whole
  tiles sit at constant offsets from the warp's first row (folded into the load instruction);
- lets a block stream several row tiles (`tiles_per_block`) as one sequence of (tile, step) pairs: the
  inputs are staged once, and the next step's loads (the next tile's first, at a tile's end) go out
  before the current step is computed (`pipeline`);
- specialises the kernel on the row stride and group size, so row offsets are immediates and the
  group index is a shift (the step body is generated unrolled: see `_step_source`);
- splits K over blocks (grid.y) when a shape has too few rows to fill the GPU, or more inputs than the
  shared staging holds (4096). Parts are summed without float atomics: each block writes its float32
  partial row sums, and the last block to arrive at a row tile (an int32 atomic counter per tile) adds
  the parts in a fixed order and writes fp16. The same arrival also merges the DecDEC correction
  (`ops.correction`), which runs concurrently on another stream and is simply one more part.

Measured on the lent H100 (bench/gemv_variants.py, CUDA graph, weights rotated past L2; HBM read 2856
GB/s in the same run): 28672x4096 at 4 bits in 36.7 us (60 % of HBM; torch's int4 tinygemm 33.0 us;
one tile per block 42.3, unpaired decode 40.3; session 1's kernel 46.4), 45.6 us at 3 bits; 4096x4096
in 11.5 / 12.3 us (tinygemm 6.8). Local SASS (ptxas sm_90): ~540 instructions per 4-bit warp step of
128 codes, 145 of them FFMA. What is left: the partial last wave (448 tiles on 264 block slots), the
pipelined words' register copies, the scale / zero loads per row and step, and for small shapes the
fixed cost of staging, epilogue and arrival around two steps per block.
"""

from __future__ import annotations

import functools
import inspect
import linecache
from dataclasses import dataclass

import numpy as np
import torch
from numba import cuda, float32, int32, uint32, uint64

from ops.layout import dequantize, unpack_codes  # noqa: F401 - re-exported: the reference's decoding

SIMULATED = cuda.jit.__module__.startswith("numba.cuda.simulator")  # the CUDA simulator runs these kernels

WARPS = 8  # warps per block; each owns its own rows (no cross-warp K split: staging is per block)
THREADS = 32 * WARPS
ROWS_PER_WARP = 8  # rows sharing one register copy of the activations (R = 4 measured slower)
STAGE_INPUTS = 4096  # inputs of x * act_scale one block stages in shared memory (16.5 KiB as float32)
PAD = 33  # shared row pitch: 32 lanes + 1, so staging writes hit distinct banks
FLAG_CAP = 256  # tiles one arrival round decides at once (<= threads of any kernel that arrives)
MAGIC_ONE = 0x3F800000  # float32 1.0: codes are or-ed into its mantissa

__all__ = [
    "base_gemv_reference", "unpack_codes", "dequantize", "base_gemv_cuda", "BaseGemv", "GemvPlan",
    "plan_gemv", "SplitOutput", "arrive_tiles", "int_as_float", "nib_float", "jit_with_bounds",
]


# ----------------------------------------------------------------------------------------------------
# CPU reference


def base_gemv_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        act_scale: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """(x * act_scale) @ deq(Q)^T in float32 on the CPU; x [..., in] -> [..., out]."""
    act_scale = torch.as_tensor(act_scale, dtype=torch.float32)
    w = dequantize(torch.as_tensor(qweight), torch.as_tensor(scales), torch.as_tensor(zeros), bits,
                   act_scale.shape[-1], group_size)
    return (x.to(torch.float32) * act_scale) @ w.T


# ----------------------------------------------------------------------------------------------------
# helpers shared by the kernels of ops/ (the correction kernel imports these)

if SIMULATED:
    def int_as_float(bits):
        """The float32 whose bit pattern is `bits` (the simulator's stand-in for libdevice)."""
        return np.array(bits).astype(np.uint32).view(np.float32)[()]
else:
    from numba.cuda import libdevice

    int_as_float = libdevice.int_as_float


@cuda.jit(device=True)
def nib_float(word, j):
    """1 + (4-bit field j of the uint32 word) / 16: the field shifted to mantissa bits 19..22 of 1.0."""
    sh = 19 - 4 * j  # a constant once the caller's j loop is unrolled
    if sh >= 0:
        v = word << uint32(sh)
    else:
        v = word >> uint32(-sh)
    return int_as_float(int32((v & uint32(0x00780000)) | uint32(MAGIC_ONE)))


@cuda.jit(device=True)
def arrive_tiles(partials, counters, out, n_out, n_parts, tile_rows, first_tile, n_tiles, flags):
    """Count this block's part in at row tiles [first_tile, first_tile + n_tiles); finish full tiles.

    Every thread of the block calls it after writing its float32 partial rows to `partials` (flat,
    [n_parts * n_out]). For each tile one int32 atomic counts the arrivals; the block that brings the
    count to n_parts sums the parts in order 0..n_parts-1 (deterministic whoever arrives last), writes
    `out` and resets the counter to 0 for the next step. Nothing waits, so the kernels that share a tile
    may run in any order or concurrently. Fences: release before the count, acquire after it.
    """
    tid = cuda.threadIdx.x
    nthr = cuda.blockDim.x
    cuda.threadfence()
    cuda.syncthreads()
    for base in range(0, n_tiles, FLAG_CAP):
        n_here = min(FLAG_CAP, n_tiles - base)
        for t in range(tid, n_here, nthr):
            tile = first_tile + base + t
            old = cuda.atomic.add(counters, tile, 1)
            flags[t] = 1 if old == n_parts - 1 else 0
            if old == n_parts - 1:
                counters[tile] = 0  # every part has arrived: nobody else touches it this step
        cuda.syncthreads()
        cuda.threadfence()
        for e in range(tid, n_here * tile_rows, nthr):
            t = e // tile_rows
            row = (first_tile + base + t) * tile_rows + e % tile_rows
            if flags[t] != 0 and row < n_out:
                s = float32(0)
                for p in range(n_parts):
                    s += partials[p * n_out + row]
                out[row] = s
        cuda.syncthreads()  # flags are reused by the next round


# ----------------------------------------------------------------------------------------------------
# launch plan and the split-output scratch


@dataclass(frozen=True)
class GemvPlan:
    """How one weight shape is cut: R rows per warp, tiles of 8 R rows, K in `k_blocks`, and each block
    taking `tiles_per_block` tiles (grid.x = ceil(n_tiles / tiles_per_block))."""

    bits: int
    out_features: int
    in_features: int
    group_size: int
    rows_per_warp: int
    k_blocks: int
    units_per_kblock: int  # units (16 inputs at 4-bit, 32 at 3-bit) per K block, a multiple of 32
    pipeline: bool = True  # prefetch the next (tile, step)'s weights: 2 blocks / SM, and on the
    # H100 faster than without (28672x4096: 47.5 vs 50.7 us at 4 bits, 51.3 vs 52.2 at 3; bench/gpu_ops.py)
    tiles_per_block: int = 1  # > 1: a block stages its inputs once and streams several tiles
    paired: bool = False  # 4-bit: decode two codes per shift (`_step_source`)

    @property
    def unit(self) -> int:
        return 16 if self.bits == 4 else 32

    @property
    def tile_rows(self) -> int:
        return WARPS * self.rows_per_warp

    @property
    def n_tiles(self) -> int:
        return -(-self.out_features // self.tile_rows)

    @property
    def grid(self) -> tuple[int, int]:
        return (-(-self.n_tiles // self.tiles_per_block), self.k_blocks)

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features * self.bits // 8


def plan_gemv(out_features: int, in_features: int, bits: int, group_size: int = 128, n_sm: int = 132,
              rows_per_warp: int = ROWS_PER_WARP, k_blocks: int | None = None, pipeline: bool = True,
              persistent: bool = True, paired: bool | None = None) -> GemvPlan:
    """Pick the K split by a small cost model: time ~ waves x (staging + tiles x (steps + epilogue)).

    Blocks run in waves of `slots` (blocks per SM x SMs, by registers). A block stages its K range's
    inputs once (~1 step) and, `persistent`, takes ceil(tiles x K blocks / slots) row tiles, each
    costing its steps plus an epilogue (reduction, arrival: ~1 step); otherwise one tile. Splitting K
    shortens tiles but adds epilogues. Each K block stages at most STAGE_INPUTS inputs and gets at
    least one full 32-lane step. `paired` defaults to True at 4 bits.
    """
    if bits not in (3, 4):
        raise ValueError(f"bits = {bits}: allowed 3 or 4")
    if in_features % 32 or group_size % 32:
        raise ValueError(f"in_features = {in_features}, group_size = {group_size}: both must be multiples of 32")
    if 32 % rows_per_warp:
        raise ValueError(f"rows_per_warp = {rows_per_warp}: allowed 1, 2, 4, 8, 16, 32")
    paired = bits == 4 if paired is None else paired
    if paired and bits != 4:
        raise ValueError("paired decoding is for 4-bit weights")
    unit = 16 if bits == 4 else 32
    n_units = in_features // unit
    max_units = STAGE_INPUTS // unit
    n_tiles = -(-out_features // (WARPS * rows_per_warp))
    slots = n_sm * _min_blocks(bits, rows_per_warp, pipeline)

    def units_for(kb: int) -> int:  # whole 32-lane steps per K block
        return min(max_units, -(-(-(-n_units // kb)) // 32) * 32)

    def tiles_for(kb: int) -> int:
        return -(-n_tiles * kb // slots) if persistent else 1

    def cost(kb: int) -> tuple[int, int]:
        units, tiles = units_for(kb), tiles_for(kb)
        blocks = -(-n_tiles // tiles) * -(-n_units // units)
        return -(-blocks // slots) * (1 + tiles * (1 + units // 32)), kb

    if k_blocks is None:
        k_blocks = min(range(-(-n_units // max_units), -(-n_units // 32) + 1), key=cost)
    units = units_for(k_blocks)
    k_blocks = -(-n_units // units)
    return GemvPlan(bits, out_features, in_features, group_size, rows_per_warp, k_blocks, units, pipeline,
                    tiles_for(k_blocks), paired)


@dataclass
class SplitOutput:
    """Scratch for an output summed from `n_parts` parts: float32 partials and one counter per row tile.

    Parts 0 .. k_blocks-1 are the GEMV's K blocks; a concurrent correction writes part n_parts - 1.
    Counters must be zero before a step; the block that completes a tile resets its counter.
    """

    partials: object  # float32 [n_parts * n_out] device array
    counters: object  # int32 [n_tiles] device array
    n_parts: int
    n_out: int
    tile_rows: int

    @classmethod
    def allocate(cls, n_out: int, tile_rows: int, n_parts: int) -> "SplitOutput":
        n_tiles = -(-n_out // tile_rows)
        return cls(cuda.to_device(np.zeros(n_parts * n_out, np.float32)),
                   cuda.to_device(np.zeros(n_tiles, np.int32)), n_parts, n_out, tile_rows)

    @property
    def n_tiles(self) -> int:
        return -(-self.n_out // self.tile_rows)


# ----------------------------------------------------------------------------------------------------
# the kernel


def _min_blocks(bits: int, R: int, pipeline: bool = False) -> int:
    """Blocks per SM to ask of the register allocator (ptxas -v, sm_90, no spills): R = 8 uses 80
    registers (3 blocks), 96 / 128 pipelined at 4 / 3 bits (2 blocks); R = 4 at most 56 (4 blocks)."""
    if R <= 4:
        return 4
    return 2 if pipeline or R > 8 else 3


def jit_with_bounds(max_threads: int, min_blocks: int):
    """`cuda.jit` with launch bounds (max_threads, min_blocks) where this Numba takes them (numba-cuda
    does; the simulator and Numba's built-in CUDA target do not)."""
    if "launch_bounds" in inspect.signature(cuda.jit).parameters:
        return cuda.jit(launch_bounds=(max_threads, min_blocks))
    return cuda.jit


PAIR_SHIFT = (15, 7, -1, -9)  # 4-bit pairs (j, j + 1), j = 0, 2, 4, 6 of a word: left shift that puts
# nibble j at mantissa bits 15..18 and nibble j + 1 at 19..22 of 1.0 (f = 1 + c / 256 and 1 + c / 16)


def pair_scale(j: int) -> float:
    """M_j of the paired 4-bit decode: input j of a unit gives f_j = 1 + code / M_j."""
    return 256.0 if j % 2 == 0 else 16.0


def _code_float(field: str, mask: int) -> str:
    """Source of the float 1.0 with the bits `mask` of `field` in its mantissa: one LOP3, as the
    constant 1.0 arrives in a register (`one`, a kernel argument: with an immediate ptxas needs two)."""
    return f"int_as_float(int32(({field} & uint32({mask:#x})) | one))"


def _shifted(word: str, sh: int) -> str:
    return f"({word} << uint32({sh}))" if sh >= 0 else f"({word} >> uint32({-sh}))"


def _step_source(bits: int, R: int, row_words: int, paired: bool = False, exact: bool = False) -> str:
    """Source of one lane's step over R rows, as two device functions written out statement by statement.

    Numba keeps the R-row block in registers only when every index is a constant, and NVVM does not
    fully unroll loops this large by itself (a 3-bit R = 8 step went to local memory), so the step is
    generated unrolled. `load` issues all R rows' weight loads of one unit (R loads in flight) and
    returns the words; `dots` then, for each input j, reads x~_j from shared memory once for all R rows
    and returns (A, S, s_0 .. s_{R-1}) with s_r = sum_j f_rj x~_j, f = 1 + code / M, S = sum_j x~_j and
    A = M S, so that sum_j code_rj x~_j = M s_r - A.
    `paired` (4-bit): the staged inputs are M_j x~_j (`pair_scale`: 256 for even j, 16 for odd), two codes
    are decoded per shift, and then sum_j code_rj x~_j = s_r - A with A = sum_j M_j x~_j (returned
    with M = 1 for the caller).
    `exact`: the rows fill whole tiles, so no row is clamped and row r's words sit at a constant offset
    from row 0's (folded into the load instruction).
    """
    unit = 16 if bits == 4 else 32
    load = ["def load(qw, row0, last_row, gu):"]
    if exact:
        load.append(f"    base = row0 * uint64({row_words}) + {'gu' if bits == 4 else 'uint64(3) * gu'}")
    for r in range(R):
        row = f"base + uint64({r * row_words})" if exact else \
            f"min(row0 + uint64({r}), last_row) * uint64({row_words}) + {'gu' if bits == 4 else 'uint64(3) * gu'}"
        if bits == 4:
            load.append(f"    w{r} = qw[{row}]")
        else:
            load += [f"    b{r} = {row}",
                     f"    a{r} = uint32(qw[b{r}])",
                     f"    c{r} = uint32(qw[b{r} + uint64(1)])",
                     f"    h{r} = uint32(qw[b{r} + uint64(2)])"]
    names = [f"w{r}" for r in range(R)] if bits == 4 else [f"{v}{r}" for r in range(R) for v in "ach"]
    load.append(f"    return ({', '.join(names)},)")
    dots = ["def dots(words, xs, xoff, one):"]
    for r in range(R):
        if bits == 4:
            dots += [f"    lo{r} = uint32(words[{r}] & uint64(0xFFFFFFFF))",
                     f"    hi{r} = uint32(words[{r}] >> uint64(32))"]
        else:
            dots += [f"    a{r} = words[{3 * r}]", f"    c{r} = words[{3 * r + 1}]", f"    h{r} = words[{3 * r + 2}]"]
    dots += ["    S = float32(0)", "    T = float32(0)"] + [f"    s{r} = float32(0)" for r in range(R)]
    if paired:
        for j in range(0, unit, 2):
            dots += [f"    x = xs[xoff + uint64({j * PAD})]", f"    y = xs[xoff + uint64({(j + 1) * PAD})]",
                     "    S += x", "    T += y"]
            for r in range(R):
                # one shift puts nibble j at mantissa bits 15..18 and nibble j + 1 at 19..22
                t = _shifted(f"{'hi' if j >= 8 else 'lo'}{r}", PAIR_SHIFT[(j % 8) // 2])
                dots += [f"    t = {t}", f"    s{r} += {_code_float('t', 0x00078000)} * x",
                         f"    s{r} += {_code_float('t', 0x00780000)} * y"]
        # S, T: the even / odd inputs' staged sums; sum_j (f_j - 1) M_j x~_j = s - (S + T), sum_j x~_j below
        dots.append(f"    return (S + T, S * float32({1 / pair_scale(0)}) + T * float32({1 / pair_scale(1)}), "
                    + ", ".join(f"s{r}" for r in range(R)) + ")")
        return "\n".join(load) + "\n\n\n" + "\n".join(dots) + "\n"
    for j in range(unit):
        dots += [f"    x = xs[xoff + uint64({j * PAD})]", "    S += x"]
        for r in range(R):
            if bits == 4:  # nibble j % 8 to mantissa bits 19..22
                f = _code_float(_shifted(f"{'hi' if j >= 8 else 'lo'}{r}", 19 - 4 * (j % 8)), 0x00780000)
            else:  # low 2 bits (16 per word) to mantissa bits 20..21, high bit (32 per word) to 22
                lo = _shifted(f"{'c' if j >= 16 else 'a'}{r}", 20 - 2 * (j % 16))
                hi = _shifted(f"h{r}", 22 - j)
                f = f"int_as_float(int32(({lo} & uint32(0x00300000)) | ({hi} & uint32(0x00400000)) | one))"
            dots.append(f"    s{r} += {f} * x")
    m = 16 if bits == 4 else 8  # sum_j (f_j - 1) M x~_j = M s - M S
    dots.append(f"    return (S * float32({m}), S, " + ", ".join(f"s{r}" for r in range(R)) + ")")
    return "\n".join(load) + "\n\n\n" + "\n".join(dots) + "\n"


@functools.lru_cache(maxsize=None)
def _make_step(bits: int, R: int, row_words: int, paired: bool = False, exact: bool = False):
    """Compile `_step_source` into device functions (load, dots); the simulator runs the same source."""
    src = _step_source(bits, R, row_words, paired, exact)
    name = f"<base_gemv.step bits={bits} R={R} row_words={row_words} paired={paired} exact={exact}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)  # tracebacks show the source
    scope = {"uint32": uint32, "uint64": uint64, "int32": int32, "float32": float32, "int_as_float": int_as_float}
    exec(compile(src, name, "exec"), scope)
    return cuda.jit(device=True)(scope["load"]), cuda.jit(device=True)(scope["dots"])


@functools.lru_cache(maxsize=None)
def _gemv_kernel(bits: int, rows_per_warp: int, row_words: int, n_groups: int, group_size: int,
                 pipeline: bool = False, paired: bool = False, exact: bool = False):
    """Kernel for one (bits, R, row stride, group count, group size): strides become immediates.
    `pipeline`: load the next (tile, step)'s weights before computing this one (twice the word
    registers); `paired`: the 4-bit decode of two codes per shift; `exact`: the rows fill whole tiles
    (no clamping; see `_step_source`)."""
    R = rows_per_warp
    UNIT = 16 if bits == 4 else 32  # inputs one lane takes per step
    M = float32(1 if paired else 16 if bits == 4 else 8)  # see `_step_source`: sum code x~ = M s - A
    STEP_IN = 32 * UNIT  # inputs one warp covers per step
    STAGE = (STAGE_INPUTS // STEP_IN) * UNIT * PAD
    STAGE_PER_THREAD = STAGE_INPUTS // THREADS
    TILE = WARPS * R
    P = 32 // R  # threads summing one row's 32 lane values in the epilogue
    RED = THREADS * R  # shared sizes must be literal constants for Numba
    load, dots = _make_step(bits, R, row_words, paired, exact)

    @jit_with_bounds(THREADS, _min_blocks(bits, R, pipeline))
    def kernel(x, act_scale, qw, scales, zeros, out, partials, counters, n_out, n_in, units_per_kblock,
               direct, n_parts, one_bits):
        """y[row] = sum over this block's K range of deq(Q)[row, i] * x[i] * act_scale[i].

        Layout: qw flat uint64 [out * in / 16] (4-bit) or uint32 [out * 3 in / 32] (3-bit); scales,
        zeros flat fp16 [out * n_groups]; out fp16 [out]; partials flat f32 [n_parts * out].
        Launch: grid (G, k_blocks), block 256. Block (b, kb) stages the inputs of units
        [kb * U, (kb + 1) * U) (U = units_per_kblock) once, then takes row tiles b, b + G, b + 2G, ...
        (8R rows each; warp w the R rows from tile * 8R + w R), streaming the weights as one sequence of
        (tile, step) pairs so that the next tile's first loads are in flight during this tile's last step.
        Bytes: the packed weights once, scales + zeros once (4 B per row and group), x and act_scale
        once per block from L2 (6 B per input per block), 2 B per row out (+ 4 B per row and K block,
        read back once, when K is split or merged). `one_bits` = MAGIC_ONE, an argument so that it
        sits in a register.
        """
        one = uint32(one_bits)
        xs = cuda.shared.array(STAGE, float32)
        red = cuda.shared.array(RED, float32)
        flags = cuda.shared.array(FLAG_CAP, int32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        kb = cuda.blockIdx.y
        u0 = kb * units_per_kblock
        n_units = min(units_per_kblock, n_in // UNIT - u0)
        n_steps = (n_units + 31) // 32
        n_tiles = (n_out + TILE - 1) // TILE
        stride = cuda.gridDim.x
        tile = cuda.blockIdx.x
        n_iter = ((n_tiles - tile + stride - 1) // stride) * n_steps  # this block's (tile, step) pairs
        last_row = uint64(n_out - 1)
        last_unit = n_units - 1  # lanes past the end load a valid unit and discard it
        warp_row = uint64(warp * R)
        words = load(qw, uint64(tile * TILE) + warp_row, last_row, uint64(u0 + min(lane, last_unit)))
        # stage x * act_scale (times M_j when paired): input e of the block goes to (step, j, lane) =
        # (e // STEP_IN, e % UNIT, (e // UNIT) % 32); all of a thread's loads go out before any store
        vals = cuda.local.array(STAGE_PER_THREAD, float32)
        n_stage = n_units * UNIT
        for q in range(STAGE_PER_THREAD):
            e = tid + q * THREADS
            if e < n_stage:
                vals[q] = float32(x[u0 * UNIT + e]) * act_scale[u0 * UNIT + e]
        for q in range(STAGE_PER_THREAD):
            e = tid + q * THREADS
            if e < n_stage:
                u = e // UNIT
                j = e % UNIT
                v = vals[q]
                if paired:
                    v *= float32(256) if j % 2 == 0 else float32(16)  # pair_scale(j)
                xs[((u // 32) * UNIT + j) * PAD + u % 32] = v
        cuda.syncthreads()

        acc = cuda.local.array(R, float32)
        for r in range(R):
            acc[r] = float32(0)
        step = 0
        for it in range(n_iter):
            row0 = uint64(tile * TILE) + warp_row
            u = step * 32 + lane
            next_step = step + 1
            next_tile = tile
            if next_step == n_steps:
                next_step = 0
                next_tile = tile + stride
            if pipeline:
                ahead = words
                if it + 1 < n_iter:
                    ahead = load(qw, uint64(next_tile * TILE) + warp_row, last_row,
                                 uint64(u0 + min(next_step * 32 + lane, last_unit)))
            elif it > 0:
                words = load(qw, row0, last_row, uint64(u0 + min(u, last_unit)))
            if u < n_units:
                g = uint64(u0 + u) * uint64(UNIT) // uint64(group_size)
                res = dots(words, xs, uint64(step * UNIT * PAD + lane), one)  # (A, S, s_0 .. s_{R-1})
                gbase = row0 * uint64(n_groups) + g
                for r in range(R):
                    if exact:  # a constant offset, folded into the load
                        gi = gbase + uint64(r * n_groups)
                    else:
                        gi = min(row0 + uint64(r), last_row) * uint64(n_groups) + g
                    acc[r] += float32(scales[gi]) * (M * res[2 + r] - res[0] - float32(zeros[gi]) * res[1])
            if pipeline:
                words = ahead
            if next_step == 0:  # the tile is complete: sum each row's 32 lane values through shared
                # memory (the simulator has no shuffles): P threads per row add R lane values each, then
                # one thread adds the P sums and writes the fp16 row (one K block) or its float32 part
                for r in range(R):
                    red[(warp * R + r) * 32 + lane] = acc[r]
                    acc[r] = float32(0)
                cuda.syncthreads()
                s = float32(0)
                for q in range(R):
                    s += red[(tid // P) * 32 + (tid % P) * R + q]
                cuda.syncthreads()
                red[tid] = s
                cuda.syncthreads()
                if tid < TILE:
                    total = float32(0)
                    for p in range(P):
                        total += red[tid * P + p]
                    row = tile * TILE + tid
                    if row < n_out:
                        if direct:
                            out[row] = total
                        else:
                            partials[kb * n_out + row] = total
                if direct:
                    cuda.syncthreads()  # the next tile's epilogue rewrites `red`
                else:
                    arrive_tiles(partials, counters, out, n_out, n_parts, TILE, tile, 1, flags)
            tile = next_tile
            step = next_step

    return kernel




def _flat(a, dtype=None):
    """A flat (1-D) view of a contiguous device array, optionally reinterpreted as dtype."""
    flat = a.reshape(int(np.prod(a.shape)))
    return flat if dtype is None else flat.view(dtype)


def _device(a):
    """A Numba device array for a Numba array, a CUDA torch tensor or any __cuda_array_interface__."""
    if isinstance(a, torch.Tensor):
        return cuda.as_cuda_array(a.detach(), sync=False)
    return a if hasattr(a, "copy_to_host") else cuda.as_cuda_array(a)


class BaseGemv:
    """A prepared GEMV: device views of one quantized linear, its plan and kernel; call it per token.

    qweight int32 [out, in * bits / 32], scales / zeros fp16 [out, ceil(in / 128)], act_scale f32 [in]
    (device arrays or CUDA tensors; converted once here, never per launch).
    """

    def __init__(self, qweight, scales, zeros, act_scale, bits: int, group_size: int = 128,
                 plan: GemvPlan | None = None):
        qweight, scales, zeros, act_scale = (_device(a) for a in (qweight, scales, zeros, act_scale))
        out_features, in_features = qweight.shape[0], act_scale.shape[0]
        if qweight.shape[1] * 32 != in_features * bits:
            raise ValueError(f"qweight has {qweight.shape[1]} words a row; {in_features} inputs at {bits} bits "
                             f"need {in_features * bits // 32}")
        n_sm = 132 if SIMULATED else cuda.get_current_device().MULTIPROCESSOR_COUNT
        self.plan = plan or plan_gemv(out_features, in_features, bits, group_size, n_sm)
        self.n_groups = -(-in_features // group_size)
        self.qw = _flat(qweight, np.uint64 if bits == 4 else np.uint32)
        self.scales, self.zeros, self.act_scale = _flat(scales), _flat(zeros), act_scale
        row_words = in_features // 16 if bits == 4 else 3 * in_features // 32
        self.kernel = _gemv_kernel(bits, self.plan.rows_per_warp, row_words, self.n_groups, group_size,
                                   self.plan.pipeline, self.plan.paired, self.plan.out_features % self.plan.tile_rows == 0)
        self._own_split: SplitOutput | None = None

    def split_output(self, extra_parts: int = 0) -> SplitOutput:
        """Scratch for this GEMV's K blocks plus `extra_parts` merged parts (1 for a DecDEC correction)."""
        p = self.plan
        return SplitOutput.allocate(p.out_features, p.tile_rows, p.k_blocks + extra_parts)

    def __call__(self, x, out, stream=0, merge: SplitOutput | None = None) -> None:
        """Launch on `stream`: out (fp16 [out]) = deq(Q) @ (x * act_scale), plus any merged part."""
        p = self.plan
        if merge is None and p.k_blocks > 1:
            if self._own_split is None:
                self._own_split = self.split_output()
            merge = self._own_split
        if merge is not None and (merge.n_out != p.out_features or merge.tile_rows != p.tile_rows
                                  or merge.n_parts < p.k_blocks):
            raise ValueError("merge scratch was made for another GEMV plan")
        direct = merge is None
        partials = merge.partials if merge else _dummy(np.float32)
        counters = merge.counters if merge else _dummy(np.int32)
        n_parts = merge.n_parts if merge else 1
        self.kernel[p.grid, THREADS, stream](
            x, self.act_scale, self.qw, self.scales, self.zeros, out, partials, counters,
            p.out_features, p.in_features, p.units_per_kblock, direct, n_parts, MAGIC_ONE)


@functools.lru_cache(maxsize=None)
def _dummy(dtype) -> object:
    """A 1-element device array for kernel arguments a launch does not use."""
    return cuda.to_device(np.zeros(1, dtype))


def base_gemv_cuda(x, qweight, scales, zeros, act_scale, bits: int, group_size: int = 128, *, out, stream=0,
                   merge: SplitOutput | None = None, plan: GemvPlan | None = None) -> None:
    """One-shot GPU `base_gemv_reference`: x fp16 [in] -> out fp16 [out] (prepare a `BaseGemv` to reuse)."""
    BaseGemv(qweight, scales, zeros, act_scale, bits, group_size, plan)(x, out, stream, merge)
