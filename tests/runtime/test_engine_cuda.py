"""The CUDA executor: its pure parts on the CPU, and on a GPU the engine against the CPU engine.

On the CPU: the buffer plan and the plan checks; the executor's own code (binding, events,
capture/replay, run, prefill, per-op timing) on a fake device whose GPU-only parts are CPU stand-ins
with the same signatures: the GEMV and the correction with the split-output merge semantics, and the
layer kernels (fused norm, attention) as their ops' CPU references on the fp16 buffers and
cache, against the CPU engine. The kernels themselves are checked against those references in
tests/ops/.

On the GPU (`DECDEC_GPU_TESTS=1`): `device: cuda` engines against `device: cpu` engines on the
same artifacts, 32 decode steps, DecDEC on and off; the captured replay against the eager path
and the profiled replay (timing events in the graph).

Tolerance against the CPU engine (float32 throughout): GEMV inputs and outputs and the KV cache are
fp16 on the GPU (relative rounding 2^-11 per value, through every layer) and the lm_head is an fp16
matmul. Without compensation, or with k_chunk 1024 (every channel picked, so nothing depends on the
selection), we require max |logit diff| <= 1e-2 * max |logit| (the CPU emulation measured
1.3e-3 on the tiny models, 1.2e-3 at k_chunk 1024 and 3.9e-3 without DecDEC on Gemma 3 270M).
With k_chunk < 1024 the selection sees fp16 activations, so a channel near the edge of the last,
partly taken bucket can flip in or out, and one flipped channel moves the logits by a visible share
of the compensation itself (emulated: up to 5 % of max |logit| on the tiny llama, 9 % on Gemma 3
3-bit RTN, where compensation moves them by 44 % / 83 %). There we require the error to stay below
35 % of the compensation's own effect (max |DecDEC - base| on the CPU): flips measure 7-11 %, while a
wiring bug (wrong group, scale, bounds or buffer) costs about the whole effect.
The captured replay runs the same launches as the eager path and the profiled replay: equal to
1e-3 * max |logit|.
"""

from tests.ops.cudasim import SIMULATED, gpu  # noqa: F401 - first: the CUDA simulator (or the GPU) is chosen there

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from decdec import runtime  # noqa: E402
from decdec.models.arch import KVCache, ModelArgs  # noqa: E402
from decdec.models.graph import build_graph  # noqa: E402
from decdec.models.loader import synthetic_model  # noqa: E402
from decdec.ops import act, attention, dma, lm_head, norm  # noqa: E402
from decdec.ops.attention import decode_attention_reference  # noqa: E402
from decdec.ops.correction import correction_reference  # noqa: E402
from decdec.ops.lm_head import dequantize_rows  # noqa: E402
from decdec.ops.norm import add_rms_norm_reference  # noqa: E402
from decdec.ops.ptx import pdl_supported  # noqa: E402
from decdec.runtime import engine as runtime_engine, executor_cuda as xc  # noqa: E402
from decdec.errors import DeviceError, ModelFileError  # noqa: E402
from decdec.scheduler.plan import MAIN, SIDE, Plan, schedule  # noqa: E402
from decdec.scheduler.tuner import REPEATS  # noqa: E402
from tests.ops.test_norm import norm_args  # noqa: E402
from tests.runtime.test_engine import TINY, tiny_cfg  # noqa: E402

STEPS = 32
GPU_TOL = 1e-2  # of max |logit|: fp16 buffers, cache and lm_head against float32 (module notes)
FLIP_SHARE = 0.35  # of the compensation's effect, where fp16 activations may flip a selected channel
REPLAY_TOL = 1e-3  # of max |logit|: captured replay against eager launches of the same kernels
K_CASES = [0, 1024, 64]  # no compensation; every channel (selection-free); the usual partial selection


def assert_close(got, want, tol):
    err = (got - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max |logit diff| {err} > {tol} * {want.abs().max().item()}"


def assert_matches_cpu(got, want, base, k_chunk: int):
    """`got` against the CPU engine's logits `want` (and its uncompensated `base`), as the module notes say."""
    if k_chunk in (0, 1024):
        assert_close(got, want, GPU_TOL)
        return
    err, effect = (got - want).abs().max().item(), (want - base).abs().max().item()
    assert err <= FLIP_SHARE * effect, f"max |logit diff| {err} > {FLIP_SHARE} * compensation effect {effect}"


def tiny_k_cfg(tmp_path, k_chunk: int, family: str, method: str) -> dict:
    """The tiny model at one k_chunk (0: selection 'none'); all k share the artifacts in tmp_path."""
    return tiny_cfg(tmp_path, k_chunk=k_chunk, selection="bucket" if k_chunk else "none", family=family,
                    method=method)


def small_args(family: str) -> tuple[ModelArgs, dict]:
    spec = {**TINY, "family": family, "n_layers": 2}
    if family == "gemma3":
        spec.update(sliding_window=4, sliding_pattern=2, query_scale=0.1)
    model = synthetic_model(spec)
    return model.args, model.weights


# ---------------------------------------------------------------------------------------------------
# pure helpers, on the CPU


def test_buffer_plan_dtypes_and_aliases():
    args, _ = small_args("llama")
    plan = schedule(build_graph(args, [3, 3], 64), folds=())  # every glue op its own launch
    specs, aliases = xc.buffer_specs(args, plan.launches)
    for i in range(args.n_layers):
        for name in (f"h.{i}", f"attn.{i}", f"h2.{i}", f"a.{i}"):  # GEMV inputs
            assert specs[name][1] == torch.float16
        for group in ("qkv", "o", "gate_up", "down"):  # GEMV outputs, completed in place by the merge
            assert specs[f"{group}.{i}.base"][1] == torch.float16
            assert not any(f"{group}.{i}.{t}" in specs for t in ("idx", "rows", "corr"))
        assert aliases[f"qkv.{i}"] == f"qkv.{i}.base"
        for name in (f"x.{i}", f"xa.{i}", f"x.{i + 1}"):  # the residual stream stays float32
            assert specs[name][1] == torch.float32
    assert specs["hf"] == (args.dim, torch.float16)
    assert specs["logits"] == (args.vocab_size, torch.float32)
    assert specs["gate_up.0.base"][0] == 2 * args.ffn_dim and specs["a.0"][0] == args.ffn_dim


def test_glue_folded_into_a_gemv_gets_no_buffer():
    """Norms, act x up and residual adds fold into the GEMV launches (and their corrections'), so their
    GEMV-side tensors (h, a, the GEMV outputs o and d) live inside those launches; the residual stream,
    qkv and gate_up still get buffers, and a compensated GEMV's output the one its merge aliases."""
    args, _ = small_args("llama")
    specs, aliases = xc.buffer_specs(args, schedule(build_graph(args, [3, 3], 0)).launches)
    for i in range(args.n_layers):
        assert not any(f"{name}.{i}" in specs for name in ("h", "h2", "a", "o", "d"))
        assert specs[f"qkv.{i}"][1] == specs[f"gu.{i}"][1] == torch.float16
        assert specs[f"xa.{i}"][1] == specs[f"x.{i + 1}"][1] == torch.float32
    specs, aliases = xc.buffer_specs(args, schedule(build_graph(args, [3, 3], 16)).launches)
    assert not any(f"{name}.0" in specs for name in ("h", "h2", "a"))
    assert specs["xa.0"][1] == specs["x.1"][1] == torch.float32 and aliases["gu.0"] == "gate_up.0.base"


def test_check_plan_accepts_schedules_and_rejects_broken_ones():
    args, _ = small_args("gemma3")
    for k in (0, 64):
        xc.check_plan(schedule(build_graph(args, [3, 3], k)))
    items = schedule(build_graph(args, [3, 3], 64)).launches
    unjoined = tuple(dataclasses.replace(it, waits=()) if it.stream == MAIN else it for it in items)
    with pytest.raises(ValueError, match="never joins back"):
        xc.check_plan(Plan(unjoined))
    with pytest.raises(ValueError, match="only the fused"):
        xc.check_plan(Plan((dataclasses.replace(items[0], stream=SIDE),) + items[1:]))
    first_side = next(i for i, it in enumerate(items) if it.stream == SIDE)
    early = (items[first_side],) + items[:first_side] + items[first_side + 1:]
    with pytest.raises(ValueError, match="before the other stream records it"):
        xc.check_plan(Plan(early))


def test_gemvs_beside_corrections_and_readers_of_compensated_outputs_keep_ordinary_edges():
    """A captured layer with every group compensated: each GEMV and its correction fork from the kernel
    that writes their input, the side stream's corrections follow one another, and the next kernel reads
    from both streams. The edges into the GEMVs stay ordinary, and so do those into the readers of every
    group but the last (their correction precedes the next one); the corrections launch early."""
    kinds = {"norm": b"_add_rms_norm_kernel", "attn": b"_attention_kernel", "C": b"_correction_kernel",
             "G": b"_mma_kernel", "embed": b"index_elementwise_kernel"}
    order = ["embed", "norm0", "C1", "G1", "attn", "C2", "G2", "norm1", "C3", "G3", "norm3", "C4", "G4", "norm2"]
    node = {name: i for i, name in enumerate(order)}
    edges = [("embed", "norm0")]
    groups = (("norm0", "C1", "G1", "attn"), ("attn", "C2", "G2", "norm1"), ("norm1", "C3", "G3", "norm3"),
              ("norm3", "C4", "G4", "norm2"))
    for u, c, g, reader in groups:
        edges += [(u, c), (u, g), (c, reader), (g, reader)]
    edges += [("C1", "C2"), ("C2", "C3"), ("C3", "C4")]  # the side stream's order
    name = {node[n]: kinds[n.rstrip("0123456789")] for n in order}
    got = set(xc.programmatic_pairs([(node[a], node[b]) for a, b in edges], name.get))
    ordinary = {(node[a], node[b]) for a, b in edges} - got
    want = {(u, g) for u, _, g, _ in groups} | {(x, r) for _, c, g, r in groups[:-1] for x in (c, g)}
    assert ordinary == {(node[a], node[b]) for a, b in want}


def test_default_n_tb():
    assert xc.default_n_tb(28672, 4096) == xc.default_n_tb(4096, 4096) == 16
    assert xc.default_n_tb(1536, 640) == xc.default_n_tb(1024, 4096) == 8
    assert xc.default_n_tb(4096, 14336) == 4  # 4 selection passes share the 16 blocks


def test_device_weights_keep_ties_and_drop_linear_groups():
    args, weights = small_args("qwen2")
    w = xc.device_weights(weights, "cpu")
    assert w["lm_head"] is w["embed"] and w["embed"].dtype == torch.float16
    assert "layers.0.qkv" not in w and "layers.1.down" not in w
    assert w["layers.0.qkv_bias"].dtype == w["layers.0.attn_norm"].dtype == w["norm"].dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    cfg = {**tiny_cfg(tmp_path), "device": "cuda"}
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        runtime.compile(cfg, progress=False)


def cpu_steps(engine, tokens) -> torch.Tensor:
    engine.reset()
    return torch.stack([engine.step(int(t)) for t in tokens])


def prefill_then_steps(engine, tokens, n_prefill: int = 8) -> torch.Tensor:
    engine.reset()
    prompt = engine.prefill(tokens[:n_prefill])
    return torch.cat([prompt, torch.stack([engine.step(int(t)) for t in tokens[n_prefill:]])])


def gemma_cfg(tmp_path, device: str, k_chunk: int = 32) -> dict:
    """Gemma 3 270M, 3-bit RTN (quick to prepare), as the slow CPU test; DECDEC_GEMMA_GGUF may name the file."""
    decdec = {"k_chunk": k_chunk, "selection": "bucket" if k_chunk else "none"}
    return {"model": {"source": os.environ.get("DECDEC_GEMMA_GGUF", "gemma3-270m"), "max_seq_len": 128},
            "quant": {"method": "rtn", "bits": 3}, "decdec": decdec,
            "calibration": {"tokens": 256, "ctx": 128}, "artifacts": str(tmp_path / "g"), "device": device}


def gemma_tokens(engine) -> torch.Tensor:
    from decdec.models.corpus import corpus_text

    return torch.tensor(engine.tokenizer.encode(corpus_text("pydoc", "eval")[:2000]))[:STEPS]


# ---------------------------------------------------------------------------------------------------
# the executor's own code (binding, events, buffers, run, prefill, profiling) on a fake device


class FakeSplit:
    """`SplitOutput` semantics: parts arrive in any order; the last one writes the sum as fp16."""

    def __init__(self, n_parts: int):
        self.n_parts, self.parts = n_parts, []

    def arrive(self, part, out, resid=None):
        """`resid`: the folded residual add, fp32 out (both arrivals must agree on it)."""
        assert out.dtype == (torch.float16 if resid is None else torch.float32)
        self.parts.append(part)
        if len(self.parts) == self.n_parts:
            out.copy_(sum(self.parts) + (0 if resid is None else resid))
            self.parts = []


def folded_input(x, act_scale, prologue: str, eps: float):
    """x~ as the GEMV and the correction make it (`ops.base_gemv.PROLOGUES`): x * act_scale, the rms_norm
    (x float32, its weight in act_scale) or act x up of gate_up (fp16) times act_scale."""
    assert x.dtype == (torch.float32 if prologue == "rms_norm" else torch.float16)
    if prologue in ("silu", "gelu_tanh"):
        return act.act_mul(norm_args("gemma3" if prologue == "gelu_tanh" else "llama"), x.float()) * act_scale
    xs = x.float() * act_scale
    return xs * torch.rsqrt(x.pow(2).mean() + eps) if prologue == "rms_norm" else xs


class FakeGemv:
    """`BaseGemv` on the CPU, same signatures; checks what the executor hands it."""

    def __init__(self, qweight, scales, zeros, act_scale, bits, group_size=128, plan=None):
        from decdec.ops.layout import dequantize

        self.weight = dequantize(qweight, scales, zeros, bits, act_scale.shape[0], group_size)
        self.act_scale = act_scale
        out_features, in_features = self.weight.shape
        self.plan = types.SimpleNamespace(out_features=out_features, in_features=in_features, tile_rows=64, merge_rows=64, mma=False)

    def split_output(self, extra_parts=0):
        return FakeSplit(1 + extra_parts)

    def beside(self, blocks):
        assert blocks >= 1
        return self

    def __call__(self, x, out, stream=0, merge=None, *, prologue="fp16", act_scale=None, eps=0.0, resid=None):
        """The folded glue as `ops.base_gemv._mma_kernel` computes it: rms_norm's 1 / rms from x, its weight
        in act_scale; act(gate) * up of gate_up; the residual added to the float32 output."""
        n_in = self.plan.in_features
        assert stream.name == "main" and tuple(x.shape) == (2 * n_in if prologue in ("silu", "gelu_tanh") else n_in,)
        assert tuple(out.shape) == (self.plan.out_features,)
        y = folded_input(x, self.act_scale if act_scale is None else act_scale, prologue, eps) @ self.weight.T
        merge.arrive(y, out, resid) if merge is not None else out.copy_(y + (0 if resid is None else resid))


class FakeCorrection:
    """The fused `Correction` on the CPU (its reference), same signatures."""

    def __init__(self, residual_rows, residual_scales, bounds, k_chunk, *, n_tb=8, tile_rows=64):
        self.rows, self.scales, self.bounds, self.k_chunk = residual_rows, residual_scales.float(), bounds, k_chunk
        self.parts, self.blocks = 1, n_tb  # it arrives once per step
        assert n_tb >= 1 and tile_rows == 64
        self.n_tb = n_tb

    def __call__(self, x, act_scale=None, *, base_out=None, out=None, merge=None, resid=None, prologue="fp16", eps=0.0,
                 stream=0):
        assert merge is not None and stream.name == "side"
        corr = correction_reference(folded_input(x, act_scale, prologue, eps), torch.zeros(out.shape[0]), self.rows,
                                    self.scales, self.bounds, self.k_chunk)
        merge.arrive(corr, out, resid)


class FakeNorm:
    """The fused `AddRmsNorm` on the CPU (its reference), same signatures."""

    def __init__(self, args, weight, x, h, branch=None, x_out=None, post_weight=None):
        self.args, self.weight, self.x, self.h, self.branch, self.x_out, self.post = (args, weight, x, h, branch,
                                                                                      x_out, post_weight)
        assert x.dtype == torch.float32 and h.dtype == torch.float16
        assert branch is None or (branch.dtype == torch.float16 and x_out.dtype == torch.float32)

    def __call__(self, stream=0):
        assert stream.name == "main"
        x, h = add_rms_norm_reference(self.args, self.x, self.weight, self.branch, self.post)
        if self.branch is not None:
            self.x_out.copy_(x)
        self.h.copy_(h)


class FakeAttention:
    """`DecodeAttention` on the CPU (its reference), same signatures."""

    def __init__(self, args, layer, plan, scratch, qkv, position, k_cache, v_cache, out, rope, bias=None, q_norm=None,
                 k_norm=None):
        assert qkv.dtype == out.dtype == k_cache.dtype == torch.float16 and len(rope) == 2
        p = f"layers.{layer}."
        self.weights = {p + k: t for k, t in (("qkv_bias", bias), ("q_norm", q_norm), ("k_norm", k_norm))
                        if t is not None}
        self.args, self.layer, self.qkv, self.position, self.cache, self.out = (args, layer, qkv, position,
                                                                                KVCache(k_cache, v_cache), out)

    def __call__(self, stream=0):
        assert stream.name == "main"
        self.out.copy_(decode_attention_reference(self.args, self.weights, self.layer, self.qkv, self.position,
                                                  self.cache))


class FakeTable:
    def __init__(self, table):
        self.table, self.nbytes = torch.from_numpy(dma.pad_rows(table)), table.nbytes

    from_array = classmethod(lambda cls, table: cls(table))
    device_array = lambda self: self.table  # noqa: E731
    close = lambda self: None  # noqa: E731


class FakeStream:
    count = 0

    def __init__(self, priority=0):
        FakeStream.count += 1
        self.cuda_stream, self.priority = FakeStream.count, priority

    def wait_event(self, event):
        assert event.recorded, "waits for an event that was never recorded"

    def synchronize(self):
        pass  # the fake's launches ran when issued


class FakeEvent:
    clock = 0

    def __init__(self, enable_timing=False, external=False):
        self.recorded, self.time, self.external = False, None, external

    def record(self, stream=None):
        FakeEvent.clock += 1
        self.recorded, self.time = True, FakeEvent.clock

    def elapsed_time(self, end):
        return float(end.time - self.time)

    def synchronize(self):
        assert self.recorded


def assert_timings(timings: list, plan: Plan) -> None:
    """The profiler's shape: one (item, start, end) per plan item, in plan order, start <= end, and the
    items of one stream one after another (a side item may overlap main ones, but need not)."""
    assert [t[0] for t in timings] == list(plan.launches)
    assert all(start <= end for _, start, end in timings)
    for stream in (MAIN, SIDE):
        spans = [(start, end) for item, start, end in timings if item.stream == stream]
        assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:])), stream


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA executor's GPU-only pieces replaced by CPU stand-ins that keep their contracts; a
    graph 'replay' re-issues the launches. Returns the executors made, to check what they did."""
    made = []
    streams = {}

    def external_stream(handle):
        return types.SimpleNamespace(name=streams[handle])

    def make_stream(priority=0):
        s = FakeStream(priority)
        streams[s.cuda_stream] = "side" if priority < 0 else "main"
        return s

    fake_numba = types.SimpleNamespace(external_stream=external_stream, as_cuda_array=lambda t, sync=True: t)
    monkeypatch.setattr(runtime_engine, "require_gpu", lambda what: None)
    for name, value in {"DEVICE": "cpu", "require_gpu": lambda what: None, "cuda": fake_numba, "BaseGemv": FakeGemv,
                        "Correction": FakeCorrection, "PinnedTable": FakeTable, "AddRmsNorm": FakeNorm,
                        "DecodeAttention": FakeAttention, "AttentionScratch": types.SimpleNamespace(allocate=lambda plan: None)
                        }.items():
        monkeypatch.setattr(xc, name, value)
    for name, value in {"is_available": lambda: True, "Stream": make_stream, "Event": FakeEvent,
                        "stream": lambda s: contextlib.nullcontext(), "synchronize": lambda: None,
                        "CUDAGraph": lambda keep_graph=False: types.SimpleNamespace(replay=None, instantiate=lambda: None),
                        "graph": lambda g, stream=None: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    init = xc.CUDAExecutor.__init__

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.graph.replay = self._issue
        made.append(self)

    capture_profiled = xc.CUDAExecutor._capture_profiled

    def tracking_capture_profiled(self):
        graph, timing = capture_profiled(self)
        graph.replay = lambda: self._issue(timing)  # a replay records the events captured into the graph
        return graph, timing

    monkeypatch.setattr(xc.CUDAExecutor, "__init__", tracking_init)
    monkeypatch.setattr(xc.CUDAExecutor, "_capture_profiled", tracking_capture_profiled)
    return made


@pytest.mark.parametrize("family, method", [("llama", "rtn"), ("gemma3", "awq")])
@pytest.mark.parametrize("k_chunk", K_CASES)
def test_cuda_executor_on_a_fake_device_matches_cpu_engine(tmp_path, fake_cuda, family, method, k_chunk):
    cfg = tiny_k_cfg(tmp_path, k_chunk, family, method)
    cpu = runtime.compile(cfg, progress=False)
    base = runtime.compile(tiny_k_cfg(tmp_path, 0, family, method), progress=False)
    dev = runtime.compile({**cfg, "device": "cuda"}, progress=False)
    assert len(fake_cuda) == (1 if k_chunk == 0 else 2) and dev.prefill_executor.cache is dev.executor.cache
    tokens = torch.randint(0, TINY["vocab_size"], (STEPS,), generator=torch.Generator().manual_seed(7))
    assert_matches_cpu(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), cpu_steps(base, tokens), k_chunk)
    # prefill (the base-only graph, token by token) then steps continue the sequence as on the CPU
    got, want, plain = (prefill_then_steps(e, tokens[:12]) for e in (dev, cpu, base))
    assert_close(got[:8], want[:8], GPU_TOL)
    assert_matches_cpu(got, want, plain, k_chunk)
    # per-op timings, in the profiled graph's replay and launched eagerly: same logits as the plain replay
    ex, plain = dev.executor, dev.executor.run(int(tokens[0]), 0)
    for eager in (False, True, False):
        timings: list = []
        assert_close(ex.run(int(tokens[0]), 0, timings, eager=eager), plain, REPLAY_TOL)
        assert_timings(timings, ex.plan)
    _, timing = ex.profiled  # captured once, on the first timed replay; its events are graph nodes
    assert timing.start.external and all(e.external for pair in timing.marks for e in pair)
    ex.run(int(tokens[1]), 1, [])
    assert ex.profiled[1] is timing
    from decdec.runtime.profiler import profile_steps

    report = profile_steps(dev, 2, eager=True)
    assert "summary by op type" in report and "inside the graph replay" in report and "eager step" in report


@pytest.mark.slow
def test_cuda_executor_on_a_fake_device_matches_cpu_engine_on_gemma3(tmp_path, fake_cuda):
    cpu, base, dev = (runtime.compile(gemma_cfg(tmp_path, device, k), progress=False)
                      for device, k in (("cpu", 32), ("cpu", 0), ("cuda", 32)))
    tokens = gemma_tokens(cpu)
    assert_matches_cpu(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), cpu_steps(base, tokens), 32)


def on_simulator(kernel_class):
    """A layer-kernel class whose torch (CPU) arguments become Numba simulator arrays over the same memory."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    def device(a):
        if isinstance(a, tuple):
            return tuple(map(device, a))
        return FakeCUDAArray(a.numpy()) if torch.is_tensor(a) else a

    return lambda *args, **kw: kernel_class(*map(device, args), **{k: device(v) for k, v in kw.items()})


@pytest.mark.skipif(not SIMULATED, reason="needs Numba's CUDA simulator")
def test_layer_kernels_in_the_simulator_match_cpu_engine(tmp_path, fake_cuda, monkeypatch):
    """The fake device with the real fused norm and attention kernels (Numba's CUDA simulator on the CPU
    buffers, cache and RoPE tables): the executor's binding of every kernel argument, end to end, on the
    tiny Gemma 3 (post-norms, q/k norms, sliding window; ~2 minutes on 2 cores)."""
    for module, name in ((norm, "AddRmsNorm"), (attention, "DecodeAttention")):
        monkeypatch.setattr(xc, name, on_simulator(getattr(module, name)))
    monkeypatch.setattr(xc, "AttentionScratch", attention.AttentionScratch)
    cfg = tiny_k_cfg(tmp_path, 0, "gemma3", "rtn")
    cpu, dev = (runtime.compile({**cfg, "device": device}, progress=False) for device in ("cpu", "cuda"))
    tokens = torch.randint(0, TINY["vocab_size"], (5,), generator=torch.Generator().manual_seed(3))
    assert_close(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), GPU_TOL)


@pytest.mark.skipif(not SIMULATED, reason="needs Numba's CUDA simulator")
def test_int8_lm_head_in_the_simulator_matches_cpu_engine(tmp_path, fake_cuda, monkeypatch):
    """quant.lm_head_bits 8 on the fake device: the int8 kernel (Numba's simulator) replaces torch's fp16
    lm_head, no fp16 lm_head goes to the device, and the logits are the CPU engine's."""
    monkeypatch.setattr(xc, "Int8LmHead", on_simulator(lm_head.Int8LmHead))
    cfg = tiny_k_cfg(tmp_path, 0, "gemma3", "rtn")
    cfg["quant"]["lm_head_bits"] = 8
    cpu, dev = (runtime.compile({**cfg, "device": device}, progress=False) for device in ("cpu", "cuda"))
    assert "lm_head" not in dev.executor.model.weights and dev.executor.model.lm_head_int8[0].dtype == torch.uint8
    tokens = torch.randint(0, TINY["vocab_size"], (3,), generator=torch.Generator().manual_seed(3))
    assert_close(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), GPU_TOL)


def test_node_n_tb_reaches_the_correction(tmp_path, fake_cuda):
    dev = runtime.compile({**tiny_k_cfg(tmp_path, 64, "llama", "rtn"), "device": "cuda"}, progress=False)
    args = dev.prepared.model.args
    graph = build_graph(args, [3, 3], 64, {("qkv", 3): 3, ("o", 3): 0, ("gate_up", 3): 5, ("down", 3): 7})
    ex = xc.CUDAExecutor(dev.executor.model, schedule(graph), 16)
    default_o = xc.default_n_tb(*args.linear_shape("o"))
    for layer in range(args.n_layers):
        got = {kind: ex.corrections[layer, kind].n_tb for kind in ("qkv", "o", "gate_up", "down")}
        assert got == {"qkv": 3, "o": default_o, "gate_up": 5, "down": 7}  # o: no attribute, the default
    default = xc.CUDAExecutor(dev.executor.model, schedule(build_graph(args, [3, 3], 64)), 16)
    assert default.corrections[0, "gate_up"].n_tb == xc.default_n_tb(*args.linear_shape("gate_up"))


FAKE_GPU = "Fake GPU"
TUNE_COST = {"qkv": 0.05, "o": 0.2, "gate_up": 0.02, "down": 0.5}  # µs per k_chunk at n_tb 8 (n_tb 2: twice)


def tiny_profile(path, device: str = FAKE_GPU, drop=()) -> None:
    """A hand-made profile of the tiny llama's shapes (pair = 10 µs + k x cost at k 4, 16, 64)."""
    from decdec.models.graph import group_shapes
    from decdec.scheduler.latency import MeasuredModel
    from decdec.scheduler.profile import MeasuredProfile

    args, _ = small_args("llama")
    rows = [{"out": out, "in": inp, "bits": bits, "k_chunk": k, "n_tb": tb, "base_us": 10.0,
             "pair_us": 10.0 + k * TUNE_COST[kind] * (2.0 if tb == 2 else 1.0)}
            for (kind, _), (out, inp, bits, _) in group_shapes(args, [3, 3]).items() if kind not in drop
            for k in (4, 16, 64) for tb in (2, 8)]
    MeasuredProfile(device, 132, 3000.0, 49.0, MeasuredModel.from_rows(device, rows), [4, 16, 64], [2, 8]).save(path)


def tuned_cfg(tmp_path, target: float, profile) -> dict:
    return {**tiny_k_cfg(tmp_path, 64, "llama", "rtn"), "device": "cuda",
            "decdec": {"target_slowdown": target, "device_profile": str(profile)}}


def test_compile_with_a_target_on_a_fake_device(tmp_path, fake_cuda, monkeypatch):
    """The base step is built and timed first (1000 µs a replay here); the tuned one is timed in turns
    with it, 4.5 % slower, under a 5 % target, so the first round is accepted; the tuner's k_chunk and
    n_tb reach every correction, and the steps equal a CPU executor of the same per-group k_chunk."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: FAKE_GPU)
    timed: list = []  # the executors measured: the base step's first, then the tuned one in turns with it
    monkeypatch.setattr(runtime.engine, "measure_step_us", lambda executor, position: timed.append(executor) or 1000.0)
    monkeypatch.setattr(runtime.engine, "measure_pair_us",
                        lambda base, executor, position: timed.append(executor) or (990.0, 1034.55))
    tiny_profile(tmp_path / "p.json")
    dev = runtime.compile(tuned_cfg(tmp_path, 0.05, tmp_path / "p.json"), progress=False)
    tuning = dev.tuning
    assert len(fake_cuda) == 2 and dev.prefill_executor.cache is dev.executor.cache
    assert tuning.step_us == pytest.approx(1000.0) and tuning.profile == str(tmp_path / "p.json")
    assert 1000.0 < tuning.predicted_step_us <= 1050.0 + 1e-9 and tuning.measured_step_us == pytest.approx(1045.0)
    assert timed == [dev.prefill_executor] + [dev.executor] * REPEATS
    assert dev.k_chunk == tuning.k_chunks and len(set(tuning.k_chunks.values())) > 1
    for (layer, kind), corr in dev.executor.corrections.items():
        assert (corr.k_chunk, corr.n_tb) == (tuning.k_chunks[kind, 3], tuning.n_tbs[kind, 3])
    assert len(dev.executor.corrections) == 2 * sum(k > 0 for k in tuning.k_chunks.values())
    tokens = torch.randint(0, TINY["vocab_size"], (STEPS,), generator=torch.Generator().manual_seed(7))
    want, base = tuned_cpu_steps(tmp_path, dev, tokens)
    assert_matches_cpu(cpu_steps(dev, tokens), want, base, 64)


def tuned_cpu_steps(tmp_path, dev, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a CPU executor running a tuned tiny-llama engine's plan with the same k_chunk per group,
    and of the CPU engine without compensation."""
    from decdec.runtime.evaluate import dense_groups
    from decdec.runtime.executor_cpu import CPUExecutor

    cpu = runtime.compile(tiny_k_cfg(tmp_path, 0, "llama", "rtn"), progress=False)
    ex = CPUExecutor(cpu.prepared.model.args, cpu.prepared.model.weights, dense_groups(cpu.prepared),
                     schedule(dev.graph, fuse=False), cpu.max_seq_len)
    return torch.stack([ex.run(int(t), p) for p, t in enumerate(tokens)]), cpu_steps(cpu, tokens)


def test_target_errors_on_a_fake_device(tmp_path, fake_cuda, monkeypatch):
    from decdec.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: FAKE_GPU)
    missing = tmp_path / "none.json"
    with pytest.raises(ConfigError, match=f"'{missing}' was not found: run `decdec tune CFG` first"):
        runtime.compile(tuned_cfg(tmp_path, 0.05, missing), progress=False)
    tiny_profile(tmp_path / "other.json", device="Other GPU")
    with pytest.raises(ConfigError, match="measured on 'Other GPU', but this GPU is 'Fake GPU'"):
        runtime.compile(tuned_cfg(tmp_path, 0.05, tmp_path / "other.json"), progress=False)
    assert not fake_cuda and not (tmp_path / "art").exists()  # both before preparing anything
    tiny_profile(tmp_path / "part.json", drop=("down",))
    with pytest.raises(ConfigError, match=r"has no measurements of down 128x1536 at 3 bits"):
        runtime.compile(tuned_cfg(tmp_path, 0.05, tmp_path / "part.json"), progress=False)
    assert not fake_cuda  # before any weight went to the device
    tiny_profile(tmp_path / "p.json")
    with pytest.raises(ConfigError, match="target slowdown 0.0% cannot be met on Fake GPU"):
        runtime.compile(tuned_cfg(tmp_path, 0.0, tmp_path / "p.json"), progress=False)


# ---------------------------------------------------------------------------------------------------
# on the GPU


def cpu_and_gpu(cfg: dict):
    """Engines on the same artifacts (the second compile reuses what the first prepared)."""
    cpu = runtime.compile({**cfg, "device": "cpu"}, progress=False)
    return cpu, runtime.compile({**cfg, "device": "cuda"}, progress=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family, method", [("llama", "rtn"), ("gemma3", "awq")])
@pytest.mark.parametrize("k_chunk", K_CASES)
def test_gpu_steps_equal_cpu_engine(tmp_path, family, method, k_chunk):
    cpu, dev = cpu_and_gpu(tiny_k_cfg(tmp_path, k_chunk, family, method))
    assert isinstance(dev.executor, xc.CUDAExecutor) and dev.executor.graph is not None
    # on Hopper and newer the graph runs with programmatic edges: the match below covers them
    assert (dev.executor.pdl_edges > 0) == pdl_supported()
    base = runtime.compile(tiny_k_cfg(tmp_path, 0, family, method), progress=False)
    tokens = torch.randint(0, TINY["vocab_size"], (STEPS,), generator=torch.Generator().manual_seed(7))
    assert_matches_cpu(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), cpu_steps(base, tokens), k_chunk)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_then_steps_equal_cpu_engine(tmp_path):
    cpu, dev = cpu_and_gpu(tiny_k_cfg(tmp_path, 1024, "llama", "rtn"))
    tokens = torch.randint(0, TINY["vocab_size"], (12,), generator=torch.Generator().manual_seed(6))
    assert_close(prefill_then_steps(dev, tokens), prefill_then_steps(cpu, tokens), GPU_TOL)


@pytest.mark.gpu
@gpu
def test_captured_replay_equals_eager_launches(tmp_path):
    dev = runtime.compile({**tiny_cfg(tmp_path, family="gemma3"), "device": "cuda"}, progress=False)
    ex = dev.executor
    tokens = torch.randint(0, TINY["vocab_size"], (16,), generator=torch.Generator().manual_seed(8))
    replayed = torch.stack([ex.run(int(t), p) for p, t in enumerate(tokens)])
    assert ex.profiled is None
    for eager in (False, True):  # per-op timing in the profiled graph's replay, then launched one by one
        timed = []
        for p, t in enumerate(tokens):
            timings: list = []
            timed.append(ex.run(int(t), p, timings, eager=eager))
            assert_timings(timings, ex.plan)
        assert_close(torch.stack(timed), replayed, REPLAY_TOL)
    assert ex.profiled is not None
    from decdec.runtime.profiler import profile_steps

    report = profile_steps(dev, 3, eager=True)
    assert "summary by op type" in report and "inside the graph replay" in report and "eager step" in report


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k_chunk", [0, 64])
def test_gpu_steps_with_int8_lm_head_equal_cpu_engine(tmp_path, k_chunk):
    cfg = tiny_k_cfg(tmp_path, k_chunk, "gemma3", "rtn")
    cfg["quant"]["lm_head_bits"] = 8
    cpu, dev = cpu_and_gpu(cfg)
    base = runtime.compile({**tiny_k_cfg(tmp_path, 0, "gemma3", "rtn"), "quant": cfg["quant"]}, progress=False)
    tokens = torch.randint(0, TINY["vocab_size"], (STEPS,), generator=torch.Generator().manual_seed(7))
    assert_matches_cpu(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), cpu_steps(base, tokens), k_chunk)
    # the int8 kernel made the last step's logits: the int8 weight's product with the step's own fp16 input
    # (switching the lm_head to int8 moves the tiny model's logits by less than GPU_TOL)
    ex = dev.executor
    assert "lm_head" not in ex.model.weights
    want = dequantize_rows(*ex.model.lm_head_int8) @ ex.state.buf["hf"].float()
    assert_close(ex.state.buf["logits"], want, 1e-4)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gemma")  # one preparation for every k_chunk (artifacts do not depend on it)


@pytest.mark.gpu
@gpu
@pytest.mark.slow
@pytest.mark.parametrize("k_chunk", [0, 1024, 32])
def test_gpu_steps_equal_cpu_engine_on_gemma3(gemma_dir, k_chunk):
    try:
        cpu, dev = cpu_and_gpu(gemma_cfg(gemma_dir, "cpu", k_chunk))
    except (ModelFileError, ImportError) as e:
        pytest.skip(f"Gemma 3 270M is not available here ({e}); set DECDEC_GEMMA_GGUF to its .gguf file")
    base = runtime.compile(gemma_cfg(gemma_dir, "cpu", 0), progress=False)
    tokens = gemma_tokens(cpu)
    assert_matches_cpu(cpu_steps(dev, tokens), cpu_steps(cpu, tokens), cpu_steps(base, tokens), k_chunk)


@pytest.mark.gpu
@gpu
def test_gpu_tune_then_compile_with_a_target(tmp_path, capsys):
    """`decdec tune --quick` measures the tiny llama's shapes on this GPU; compile with a target loads
    that profile, times the base step and captures the tuned step. Its k_chunk and n_tb reach the
    kernels, and its logits match a CPU executor of the same per-group k_chunk: within the fp16 bound,
    or (small k_chunk picks few channels, so a flipped one weighs more) within FLIP_SHARE of the
    compensation's effect."""
    import yaml

    from decdec.runtime.cli import main
    from decdec.runtime.tune import measure_step_us
    from decdec.scheduler.profile import MeasuredProfile

    cfg = tiny_k_cfg(tmp_path, 64, "llama", "rtn")
    cfg_path, profile = tmp_path / "cfg.yaml", tmp_path / "profile.json"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(cfg_path), "--quick", "--out", str(profile)]) == 0
    assert "frontier" in capsys.readouterr().out
    assert MeasuredProfile.load(profile).device == torch.cuda.get_device_name()
    dev = runtime.compile({**cfg, "device": "cuda", "decdec": {"target_slowdown": 1.0, "device_profile": str(profile)}},
                          progress=False)
    tuning = dev.tuning
    assert tuning.step_us > 0 and tuning.step_us < tuning.predicted_step_us <= 2 * tuning.step_us + 1e-6
    for (layer, kind), corr in dev.executor.corrections.items():
        assert (corr.k_chunk, corr.plan.n_tb) == (tuning.k_chunks[kind, 3], tuning.n_tbs[kind, 3])
    tokens = torch.randint(0, TINY["vocab_size"], (STEPS,), generator=torch.Generator().manual_seed(7))
    got = cpu_steps(dev, tokens)
    want, base = tuned_cpu_steps(tmp_path, dev, tokens)
    err, effect = (got - want).abs().max().item(), (want - base).abs().max().item()
    assert err <= max(GPU_TOL * want.abs().max().item(), FLIP_SHARE * effect), (err, effect)
    measured = measure_step_us(dev.executor)
    print(f"\n{tuning.format()}\nmeasured tuned step {measured:.1f} µs ({measured / tuning.step_us - 1:+.1%})")
