"""The LLM core: the models the kernel serves, one engine each, and the one way prompts become tokens.
Nothing else in the kernel touches a model."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kernos.scheduler import Programs

from .base import Engine
from .echo import EchoEngine, EchoTokenizer
from .settings import EngineConfig, ModelConfig
from .structured import compile_matcher
from .tool_calls import chat_template_input

log = logging.getLogger("kernos.llm")


@dataclass
class ServedModel:
    name: str
    engine: Engine
    architecture: str
    device: str
    dtype: str
    adapters: list[str]
    context_length: int
    parameters: int
    tokenizer: object
    chat: bool                 # the tokenizer has a chat template

    vocab_size: int = 0        # rows of the model's logits
    path: Path | None = None   # its local folder (what the tuner trains adapters on); None: no model files

    def encode_chat(self, messages: list[dict], output=None) -> list[int]:
        """The prompt of a conversation: the chat template, with the tools of `output` (an OutputSpec) in the
        template's own way if it has one, else in the default convention (`tool_calls.py`)."""
        if isinstance(self.tokenizer, EchoTokenizer):
            return self.tokenizer.encode(messages[-1].get("content", ""))
        tools = output.tools if output is not None and output.calls_tools else ()
        messages, kwargs = chat_template_input(self.tokenizer, messages, tools)
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def matcher(self, output):
        """A fresh compiled grammar for one request's `output` (None: free text)."""
        grammar = output.grammar() if output is not None else None
        if grammar is None or isinstance(self.tokenizer, EchoTokenizer):
            return None
        return compile_matcher(grammar, self.tokenizer, self.vocab_size)

    def encode_prompt(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, EchoTokenizer):
            return self.tokenizer.encode(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def engine_threads(configured: int) -> int:
    """Torch threads for decoding: as configured, else every core this process may use but one, which is
    left to the kernel's servers and to clients on the same machine. Measured on 2 cores (vs_vllm.py,
    SmolLM2-135M, bf16): 1 thread gave 158 and 288 tok/s at 8 and 24 agents, 2 threads 107 and 155."""
    if configured:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _load(cfg: ModelConfig, engine_cfg: EngineConfig, make_policy, data_dir: Path) -> ServedModel:
    if cfg.kind == "echo":
        engine = EchoEngine(cfg.name)
        return ServedModel(cfg.name, engine, "echo", "none", "none", [], 1 << 20, 0, engine.tokenizer, True)
    if cfg.kind == "vllm":
        from .vllm.engine import VllmEngine

        engine = VllmEngine(cfg, engine_cfg, data_dir, make_policy())
        engine.open()
        return ServedModel(cfg.name, engine, engine.architecture, engine.device, engine.dtype, engine.adapters,
                           engine.context_length, engine.parameters(), engine.tokenizer,
                           bool(getattr(engine.tokenizer, "chat_template", None)), engine.vocab_size, engine.path)
    import torch

    from .engine import TransformersEngine
    from .registry import load_model

    torch.set_num_threads(engine_threads(engine_cfg.threads))
    lm = load_model(cfg, engine_cfg, data_dir)
    e = engine_cfg
    engine = TransformersEngine(lm, max_batch_size=e.max_batch_size, policy=make_policy(),
                                max_tokens_in_flight=e.max_tokens_in_flight, cache_budget_bytes=e.cache_budget_bytes,
                                preemption=e.preemption, swap_host_bytes=e.swap_host_bytes,
                                swap_dir=data_dir / "swap" / cfg.name, resident_bytes=e.resident_cache_bytes,
                                resident_ttl_s=e.resident_ttl_s, prefill_chunk=e.prefill_chunk_tokens,
                                pause_max_s=e.tool_pause_max_s, prefill_per_step=e.prefill_tokens_per_step,
                                prompt_lookup=e.prompt_lookup_tokens,
                                prefill_step_s=e.prefill_step_ms / 1e3,
                                prefill_shrink_from=(e.prefill_chunk_shrink_from if e.prefill_chunk_shrink_from >= 0
                                                     else 2048 if lm.device.type == "cpu" else 0))
    return ServedModel(cfg.name, engine, lm.architecture, str(lm.device), str(lm.dtype).replace("torch.", ""),
                       lm.adapters, lm.context_length, lm.parameters, lm.tokenizer,
                       bool(getattr(lm.tokenizer, "chat_template", None)),
                       int(lm.model.get_output_embeddings().weight.shape[0]), lm.path)


class LLMCore:
    """The served models: each entry loaded on its engine (own, vLLM or echo), each engine with its own
    scheduling policy (`make_policy()`), converted models and swap space under `data_dir`."""

    def __init__(self, models: list[ModelConfig], default: str, engine: EngineConfig, make_policy, data_dir: Path):
        self.default = default
        self.programs = Programs()          # agent programs across every model (kernos.scheduler.programs)
        self.models: dict[str, ServedModel] = {}
        for cfg in models:
            self.models[cfg.name] = _load(cfg, engine, make_policy, data_dir)
        for m in self.models.values():
            m.engine.start()

    def get(self, name: str | None) -> ServedModel | None:
        return self.models.get(name or self.default)

    def drain(self, timeout: float) -> bool:
        clean = True
        for m in self.models.values():
            clean = m.engine.drain(timeout) and clean
        return clean
