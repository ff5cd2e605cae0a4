"""Hyper-parameters of a LoRA fine-tuning job: validated once, at the edge (the Tuner service and the CLI)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; None: attention, MLP and Mamba projections found in the model")
    target_experts: bool = Field(True, description="MoE: also adapt fused expert weights (peft target_parameters)")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int = Field(0, ge=0, description="0: epochs x batches per epoch")
    batch_size: int = Field(4, ge=1, le=512)
    max_length: int = Field(512, ge=8, le=32768, description="tokens per example; longer ones keep their end")
    checkpoint_every: int = Field(25, ge=1, description="steps between checkpoints (resume point after a crash)")
    eval_max_new_tokens: int = Field(48, ge=1, le=1024)
    eval_limit: int = Field(200, ge=1, description="held-out examples evaluated at most")
    beta: float = Field(0.1, gt=0, le=10, description="DPO/KTO: how far the adapter may move from the reference "
                                                       "model (larger: closer to it)")
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch threads in the worker, at most the kernel's tuner.threads; 0: "
                                               "that many")

    @model_validator(mode="after")
    def _targets(self):
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: give module names, or leave it out for the automatic choice")
        return self
