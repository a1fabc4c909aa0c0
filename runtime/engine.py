"""`runtime.compile(cfg)` -> Engine: prepare (or reuse) artifacts, build the op graph, schedule it,
and bind an executor (CPU reference, or CUDA: one captured graph per step). `step()` is one decode
step of the static graph.

With `decdec.target_slowdown` (device cuda only) compile tunes: it loads this GPU's device profile
(`decdec tune`), captures the base-only step and times its replays, and lets the tuner spend
target x that time over the model's (kind, bits) group shapes; the decode graph then carries each
group's k_chunk and n_tb. The tuned step is captured and timed too, and retuned with a smaller
budget while it is over the target (`scheduler.tuner.tune_measured`); `engine.tuning` keeps the
choices, the predicted and the measured step time.

Generation: `tokens()` yields token ids as they are decoded, continuing the current sequence;
`stream()` yields the text of a new sequence piece by piece; `generate()` returns it whole.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Iterable, Iterator

import torch

from decdec.models.arch import forward
from decdec.models.graph import build_graph, group_shapes
from decdec.models.prepare import Prepared, prepare
from decdec.config import Config, load_config
from decdec.errors import ConfigError, InputError
from decdec.runtime.evaluate import decdec_linear, dense_groups
from decdec.runtime.executor_cpu import CPUExecutor
from decdec.graph import Graph
from decdec.runtime.tune import TUNE_POSITION, load_profile, measure_pair_us, measure_step_us, require_gpu
from decdec.scheduler.plan import Plan, schedule
from decdec.scheduler.profile import MeasuredProfile
from decdec.scheduler.tuner import Tuning, check_shapes, tune_measured


class Engine:
    def __init__(self, prepared: Prepared, graph: Graph, plan: Plan, executor, k_chunk: int | dict,
                 prefill_executor=None, tuning: Tuning | None = None):
        self.prepared, self.graph, self.plan, self.executor = prepared, graph, plan, executor
        self.k_chunk = k_chunk  # one for every group, or the tuner's (kind, bits) -> k_chunk
        self.prefill_executor = prefill_executor  # CUDA: the base-only step, replayed per prompt token
        self.tuning = tuning  # with decdec.target_slowdown: choices, measured base step, predicted step
        self.config: Config = prepared.config
        self.tokenizer = prepared.model.tokenizer
        self.position = 0

    @property
    def max_seq_len(self) -> int:
        return self.executor.cache.k.shape[1]

    def reset(self) -> None:
        """Start a new sequence (the KV cache is overwritten position by position)."""
        self.position = 0

    def _check_room(self, n: int) -> None:
        if self.position + n > self.max_seq_len:
            raise ConfigError(
                f"sequence of {self.position + n} tokens exceeds model.max_seq_len = {self.max_seq_len}"
            )

    def _out_of_range(self, what: str) -> InputError:
        return InputError(f"{what} is not a token id of this model: allowed 0 .. {self.prepared.model.args.vocab_size - 1}")

    @torch.no_grad()
    def prefill(self, token_ids) -> torch.Tensor:
        """Logits [T, vocab] of a prompt's token ids (from `engine.tokenizer.encode(text)`), with the
        base (uncompensated) kernels, filling the KV cache after the tokens already in it."""
        ids = torch.as_tensor(token_ids).reshape(-1)
        if ids.numel() == 0:
            raise InputError("prefill needs at least one token id, got an empty prompt")
        if ids.is_floating_point() or ids.is_complex():
            raise InputError(f"token ids must be integers, got {ids.dtype}")
        bad = ((ids < 0) | (ids >= self.prepared.model.args.vocab_size)).nonzero()
        if bad.numel():
            raise self._out_of_range(f"token {int(ids[bad[0, 0]])} (at index {int(bad[0, 0])})")
        tokens = ids.to(torch.int64)
        self._check_room(tokens.shape[0])
        args, weights = self.prepared.model.args, self.prepared.model.weights
        if self.prefill_executor is not None:  # CUDA: token by token through the base-only step graph
            logits = torch.stack([self.prefill_executor.run(t, self.position + i) for i, t in enumerate(tokens.tolist())])
        else:
            base = decdec_linear(self.executor.groups, "none")  # the quantized weights, no compensation
            logits = forward(args, weights, tokens, base, self.position, self.executor.cache)
        self.position += tokens.shape[0]
        return logits

    def step(self, token: int) -> torch.Tensor:
        """One decode step of `token` at the next position: logits [vocab]."""
        try:
            token = operator.index(token)  # an int, a NumPy integer or a one-element integer tensor
        except TypeError:
            raise InputError(f"token {token!r} is not an integer token id") from None
        if not 0 <= token < self.prepared.model.args.vocab_size:
            raise self._out_of_range(f"token {token}")
        self._check_room(1)
        logits = self.executor.run(token, self.position)
        self.position += 1
        return logits

    def tokens(self, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
               stop: Iterable[int] = ()) -> Iterator[int]:
        """Prefill `prompt_ids` after the sequence so far, then yield each new token id as it is
        decoded: greedy (temperature 0) or sampled; ends at EOS, a `stop` id, `max_new_tokens` or a
        full cache. Every yielded token enters the cache before the next one is decoded."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens = {max_new_tokens!r}: allowed 0 or more")
        if not temperature >= 0:
            raise InputError(f"temperature = {temperature!r}: allowed 0 or more")
        logits = self.prefill(prompt_ids)[-1]  # now: bad ids fail here, not at the first next()
        return self._decode(logits, max_new_tokens, temperature, seed, {self.prepared.model.args.eos_id, *stop})

    def _decode(self, logits, max_new_tokens: int, temperature: float, seed: int, stop: set) -> Iterator[int]:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(max_new_tokens):
            if temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                token = int(logits.argmax())
            if token in stop or self.position >= self.max_seq_len:
                return
            yield token
            logits = self.step(token)

    def stream(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
               ids: list[int] | None = None) -> Iterator[str]:
        """Start a new sequence with `prompt` and yield its continuation's text as tokens are decoded
        (their ids appended to `ids` when given)."""
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer (synthetic source): use prefill/step with token ids")
        if not isinstance(prompt, str) or not prompt:
            raise InputError(f"prompt must be a non-empty string, got {prompt!r}")
        self.reset()
        return text_pieces(self.tokenizer, self.tokens(self.tokenizer.encode(prompt), max_new_tokens, temperature, seed), ids)

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> str:
        """Greedy (temperature 0) or sampled continuation of `prompt`."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, seed))


def text_pieces(tokenizer, token_ids: Iterable[int], ids: list[int] | None = None) -> Iterator[str]:
    """The text of `token_ids`, piece by piece as they arrive (appended to `ids` when given). A token
    that ends inside a multi-byte character decodes to U+FFFD: its text waits for the one completing it."""
    ids = [] if ids is None else ids
    shown = ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids)
    if text != shown and text.startswith(shown):
        yield text[len(shown):]


def engine_k_chunk(cfg: Config) -> int | None:
    """The k_chunk of every group, or None where the tuner chooses per group (decdec.target_slowdown).
    The tuner needs this GPU's measured latency model, so a target on the CPU is an error."""
    d = cfg.decdec
    if d.selection == "none":
        return 0
    if d.selection != "bucket":
        raise ConfigError(
            f"config field 'decdec.selection' = '{d.selection}' is an evaluation baseline: "
            "the engine runs 'bucket' or 'none'"
        )
    if d.k_chunk is not None:
        return d.k_chunk
    if cfg.device != "cuda":
        raise ConfigError(
            f"config field 'decdec.target_slowdown' = {d.target_slowdown} needs device 'cuda' (the tuner "
            f"spends it on the GPU's measured latency model); device is '{cfg.device}': set 'decdec.k_chunk'"
        )
    return None


def compile(model_cfg, progress: bool = True, force: bool = False) -> Engine:
    """Config (YAML path, dict or Config) -> a ready decode engine."""
    cfg = load_config(model_cfg)
    if cfg.device == "cuda":  # before the minutes of prepare
        require_gpu("config asks for device 'cuda'")
    k_chunk = engine_k_chunk(cfg)
    profile, path = None, None
    if k_chunk is None:  # a missing or foreign device profile fails now, not after prepare
        name = str(model_cfg) if isinstance(model_cfg, (str, Path)) else "CFG"
        profile, path = load_profile(cfg, torch.cuda.get_device_name(), name)
    prepared = prepare(cfg, force=force, progress=progress)
    if cfg.device == "cuda":
        return compile_cuda(prepared, k_chunk, profile, path)
    graph = build_graph(prepared.model.args, prepared.layer_bits, k_chunk)
    plan = schedule(graph, fuse=False)
    executor = CPUExecutor(prepared.model.args, prepared.model.weights, dense_groups(prepared), plan,
                           cfg.model.max_seq_len)
    return Engine(prepared, graph, plan, executor, k_chunk)


def compile_cuda(prepared: Prepared, k_chunk: int | None, profile: MeasuredProfile | None = None,
                 profile_path: Path | None = None) -> Engine:
    """The CUDA engine. The base-only step is built first: prefill replays it token by token, and with
    a target (`k_chunk` None, `profile` loaded from `profile_path`) its replay time is the tuner's step.
    The decode step shares its weights (one `DeviceModel`) and KV cache; without compensation it is
    the base step itself."""
    from decdec.runtime.executor_cuda import CUDAExecutor, DeviceModel  # Numba's CUDA loads only when asked for

    args, bits, max_seq = prepared.model.args, prepared.layer_bits, prepared.config.model.max_seq_len
    shapes = group_shapes(args, bits)
    if profile is not None:  # before the weights go to the GPU
        check_shapes(profile.model, shapes, profile_path)
    model = DeviceModel(args, prepared.model.weights, prepared.groups, residuals=k_chunk != 0,
                        lm_head_int8=prepared.lm_head_int8)
    base_graph = build_graph(args, bits, 0)
    base = CUDAExecutor(model, schedule(base_graph), max_seq)
    if k_chunk == 0:
        return Engine(prepared, base_graph, base.plan, base, 0, base)

    def build(k, n_tb=0) -> tuple[Graph, CUDAExecutor]:
        graph = build_graph(args, bits, k, n_tb)
        return graph, CUDAExecutor(model, schedule(graph), max_seq, cache=base.cache)

    if profile is None:
        graph, decode = build(k_chunk)
        return Engine(prepared, graph, decode.plan, decode, k_chunk, base)
    # tuned, then checked by measuring the captured step in turns with the base step (scheduler.tuner.tune_measured)
    position = min(TUNE_POSITION, max_seq - 1)
    step_us = measure_step_us(base, position)

    def measure(built) -> float:  # the tuned step, in µs of step_us's scale
        base_us, built_us = measure_pair_us(base, built[1], position)
        return step_us * built_us / base_us

    tuning, (graph, decode) = tune_measured(profile.model, shapes, step_us, prepared.config.decdec.target_slowdown,
                                            lambda t: build(t.k_chunks, t.n_tbs), measure, profile_path)
    return Engine(prepared, graph, decode.plan, decode, tuning.k_chunks, base, tuning)
