"""What a vLLM model reports: its per-step stats into Kernos's EngineStats (a vLLM stat logger), the KV bytes a
token takes in its cache, its parameter count."""
from __future__ import annotations


def stat_logger(engine):
    """A vLLM stat logger class (vLLM makes one per engine core) that writes into `engine`'s EngineStats."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KernosStats(StatLoggerBase):
        """vLLM's per-step scheduler and iteration stats into the engine's EngineStats."""

        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            st = engine.stats
            if scheduler_stats is not None:
                st.cache_bytes = int(scheduler_stats.kv_cache_usage * engine.kv_bytes)
            if iteration_stats is not None:
                n = iteration_stats.num_generation_tokens
                if n:
                    st.decode_steps += 1
                    st.batch_rows += n
                pre = iteration_stats.num_preempted_reqs
                if pre:         # vLLM preempts by dropping the KV and recomputing it
                    st.context_switches += pre
                    st.preempted_by_reason["kv cache full"] = st.preempted_by_reason.get("kv cache full", 0) + pre
                    st.strategy_counts["recompute"] = st.strategy_counts.get("recompute", 0) + pre

        def log_engine_initialized(self):
            pass

    return KernosStats


def parameters(path) -> int:
    """The parameters in a model folder's safetensors files."""
    from safetensors import safe_open

    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "np") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n += int(_prod(shape))
    return n


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def bytes_per_token(llm) -> int:
    """KV bytes one token takes in vLLM's cache, over every attention layer (0 where it cannot be told)."""
    mc = llm.model_config
    try:
        layers = mc.get_num_layers_by_block_type(llm.vllm_config.parallel_config, "attention")
        per_layer = 2 * mc.get_num_kv_heads(llm.vllm_config.parallel_config) * mc.get_head_size()
    except Exception:
        return 0
    import torch

    kv_dtype = llm.vllm_config.cache_config.cache_dtype
    size = torch.tensor([], dtype=mc.dtype).element_size() if kv_dtype == "auto" else 1
    return layers * per_layer * size
