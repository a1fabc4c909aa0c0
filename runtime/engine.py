"""`runtime.compile(cfg)` -> Engine: prepare (or reuse) artifacts, build the op graph, schedule it,
and bind an executor (CPU reference, or CUDA: one captured graph per step). `step()` is one decode
step of the static graph.
"""

from __future__ import annotations

import torch

from models.arch import forward
from models.graph import build_graph
from models.prepare import Prepared, prepare
from runtime.config import Config, load_config
from runtime.errors import ConfigError, DeviceError
from runtime.evaluate import decdec_linear
from runtime.executor_cpu import CPUExecutor, cpu_groups
from runtime.graph import Graph
from scheduler.plan import Plan, schedule


class Engine:
    def __init__(self, prepared: Prepared, graph: Graph, plan: Plan, executor, k_chunk: int, prefill_executor=None):
        self.prepared, self.graph, self.plan, self.executor = prepared, graph, plan, executor
        self.k_chunk = k_chunk
        self.prefill_executor = prefill_executor  # CUDA: the base-only step, replayed per prompt token
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

    @torch.no_grad()
    def prefill(self, token_ids) -> torch.Tensor:
        """Logits [T, vocab] of a prompt, with the base (uncompensated) kernels, filling the KV cache."""
        tokens = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        self._check_room(tokens.shape[0])
        args, weights = self.prepared.model.args, self.prepared.model.weights
        if self.prefill_executor is not None:  # CUDA: token by token through the base-only step graph
            rows = [self.prefill_executor.run(int(t), self.position + i) for i, t in enumerate(tokens.tolist())]
            logits = torch.stack(rows) if rows else torch.empty(0, args.vocab_size)
        else:
            base = decdec_linear(self.executor.groups, "none")  # the quantized weights, no compensation
            logits = forward(args, weights, tokens, base, self.position, self.executor.cache)
        self.position += tokens.shape[0]
        return logits

    def step(self, token: int) -> torch.Tensor:
        """One decode step at the next position: logits [vocab]."""
        self._check_room(1)
        logits = self.executor.run(int(token), self.position)
        self.position += 1
        return logits

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> str:
        """Greedy (temperature 0) or sampled continuation of `prompt`."""
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer (synthetic source): use prefill/step with token ids")
        self.reset()
        ids = self.tokenizer.encode(prompt)
        logits = self.prefill(ids)[-1]
        gen = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                token = int(logits.argmax())
            if token == self.prepared.model.args.eos_id or self.position >= self.max_seq_len:
                break
            out.append(token)
            logits = self.step(token)
        return self.tokenizer.decode(out)


def engine_k_chunk(cfg: Config) -> int:
    d = cfg.decdec
    if d.selection == "none":
        return 0
    if d.selection != "bucket":
        raise ConfigError(
            f"config field 'decdec.selection' = '{d.selection}' is an evaluation baseline: "
            "the engine runs 'bucket' or 'none'"
        )
    if d.k_chunk is None:
        raise ConfigError(
            "config field 'decdec.target_slowdown' needs the tuner, which compile does not run yet: "
            "set 'decdec.k_chunk'"
        )
    return d.k_chunk


def compile(model_cfg, progress: bool = True, force: bool = False) -> Engine:
    """Config (YAML path, dict or Config) -> a ready decode engine."""
    cfg = load_config(model_cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():  # before the minutes of prepare
        raise DeviceError("config asks for device 'cuda', but no CUDA device is available here")
    k_chunk = engine_k_chunk(cfg)
    prepared = prepare(cfg, force=force, progress=progress)
    graph = build_graph(prepared.model.args, prepared.layer_bits, k_chunk)
    plan = schedule(graph)
    if cfg.device == "cuda":
        executor, prefill_executor = cuda_executors(prepared, plan, k_chunk, cfg.model.max_seq_len)
        return Engine(prepared, graph, plan, executor, k_chunk, prefill_executor)
    groups = cpu_groups(prepared.groups, {key: k_chunk for key in prepared.groups})
    executor = CPUExecutor(prepared.model.args, prepared.model.weights, groups, plan, cfg.model.max_seq_len)
    return Engine(prepared, graph, plan, executor, k_chunk)


def cuda_executors(prepared: Prepared, plan: Plan, k_chunk: int, max_seq_len: int, capture: bool = True):
    """(decode executor, prefill executor): the plan's step on the GPU, and the base-only step that
    prefill replays token by token (the same executor when nothing is compensated). One copy of the
    weights, one KV cache."""
    from runtime.executor_cuda import CUDAExecutor, DeviceModel  # Numba's CUDA loads only when asked for

    args = prepared.model.args
    model = DeviceModel.from_prepared(args, prepared.model.weights, prepared.groups, residuals=k_chunk > 0)
    decode = CUDAExecutor(model, plan, max_seq_len, capture=capture)
    if k_chunk == 0:
        return decode, decode
    base_plan = schedule(build_graph(args, prepared.layer_bits, 0))
    return decode, CUDAExecutor(model, base_plan, max_seq_len, capture=capture, cache=decode.cache)
