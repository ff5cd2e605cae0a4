"""Loading models from local folders (safetensors + tokenizer) by architecture, with optional LoRA
adapters. Nothing here touches the network: every load is `local_files_only`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import embedded, window
from .cpu_speed import fast_cpu_dtype, pack_linears, use_cpu_attention
from .settings import EngineConfig, ModelConfig

log = logging.getLogger("kernos.llm")

_MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "granitemoe", "phimoe"}
_HYBRID = {"jamba", "bamba", "zamba", "zamba2", "falcon_h1", "granitemoehybrid", "nemotron_h"}


class ModelLoadError(RuntimeError):
    pass


def architecture_of(model_type: str) -> str:
    if model_type in _HYBRID:
        return "hybrid"
    if model_type in _MOE:
        return "moe"
    return "dense"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module          # a PeftModel when adapters are loaded
    tokenizer: object
    architecture: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    parameters: int
    eos_ids: set[int]
    adapters: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapters)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"engine.device is '{spec}' but CUDA is not available on this machine")
    return dev


def resolve_dtype(spec: str, device: torch.device, architecture: str = "dense") -> torch.dtype:
    """auto: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 on other CPUs. Hybrid
    (Mamba) models stay fp32 on CPUs: in bf16 their state rebuilt by a prefill (a preempted sequence
    recomputed) differs from the state decoding built step by step, and greedy resumes would drift."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.float32 if architecture == "hybrid" else fast_cpu_dtype()
    return getattr(torch, spec)


def model_folder(cfg: ModelConfig, data_dir: Path) -> Path:
    """The local folder a model entry names (the embedded model: converted under the data dir on first use)."""
    path = embedded.ensure_converted(data_dir) if cfg.path == "embedded" else Path(cfg.path).expanduser()
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model '{cfg.name}': {path} has no config.json (expected a local transformers folder)")
    return path


def load_model(cfg: ModelConfig, engine: EngineConfig, data_dir: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = model_folder(cfg, data_dir)
    device = resolve_device(engine.device)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        ctx = window.apply(cfg, hf_config)
        dtype = resolve_dtype(cfg.dtype or engine.dtype, device, architecture_of(hf_config.model_type))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype, local_files_only=True)
    except window.WindowError as e:
        raise ModelLoadError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model '{cfg.name}': cannot load {path}: {e}") from e
    model.to(device).eval()
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "dynamic":
        window.fix_dynamic_rope(model, hf_config, window.window(hf_config))
    parameters = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and dtype == torch.bfloat16 and engine.pack_cpu_weights:
        pack_linears(model, own_kernels=engine.cpu_kernels != "off", amx=engine.cpu_kernels == "auto")
        use_cpu_attention(model)
        _start_kernel_helpers(model, engine)
    elif device.type == "cpu":
        use_cpu_attention(model)
    adapters = []
    if cfg.adapters:
        model = _attach_adapters(cfg, model)
        adapters = list(cfg.adapters)
    eos = eos_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    lm = LoadedModel(
        name=cfg.name, model=model, tokenizer=tokenizer, architecture=architecture_of(hf_config.model_type),
        device=device, dtype=dtype, context_length=ctx, parameters=parameters, eos_ids=eos, adapters=adapters,
        path=path,
    )
    log.info("loaded model %s (%s, %s, %.1fM params, %s, adapters=%s)", cfg.name, hf_config.model_type,
             lm.architecture, parameters / 1e6, device, adapters or "none")
    return lm


def _start_kernel_helpers(model, engine: EngineConfig) -> None:
    """Where the own CPU kernels serve, helper threads on the cores the compute threads leave (on 2 cores the
    second one, which the kernel's servers and local clients leave mostly idle: measured ~50% idle)."""
    import os

    from . import cpu_kernels

    if not any(isinstance(getattr(m, "_kernos_packed", None), cpu_kernels.PackedWeight) for m in model.modules()):
        return
    count = engine.kernel_helpers
    if count < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        count = max(0, cores - torch.get_num_threads())
    if count:
        log.info("own CPU kernels: %d helper thread(s)", cpu_kernels.start_helpers(count))


def eos_ids(tokenizer, generation_eos) -> set[int]:
    """The tokens that end a generation: the generation config's (one or a list) and the tokenizer's."""
    ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return {int(e) for e in ids + [tokenizer.eos_token_id] if e is not None}


def peft_name(name: str) -> str:
    """peft adapter names become module keys, which may not contain '.'; served names may ("a.b:c")."""
    return name.replace(".", "\u2024")


def _attach_adapters(cfg: ModelConfig, model):
    from peft import PeftModel

    peft_model = None
    for name, folder in cfg.adapters.items():
        folder_path = Path(folder).expanduser()
        if not (folder_path / "adapter_config.json").exists():
            raise ModelLoadError(f"model '{cfg.name}': adapter '{name}': {folder_path} has no adapter_config.json")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, folder_path, adapter_name=peft_name(name), is_trainable=False)
        else:
            peft_model.load_adapter(folder_path, adapter_name=peft_name(name), is_trainable=False)
    peft_model.eval()
    return peft_model

