"""LoRA training and evaluation on chat examples, one plain loop (nanoGPT style), resumable.

Examples are {"messages": [...]} (optionally "answer": a short answer the reply must contain). They are
encoded with the served model's own chat template, and the loss covers assistant turns only: each
assistant turn's tokens are the difference between the template of the chat up to it (with the generation
prompt) and up to and including it, so the end-of-turn token is learnt too.

The loop checkpoints the adapter weights, optimizer state and step atomically every `checkpoint_every`
steps; `train()` resumes from that checkpoint, and batch order is a function of (seed, epoch), so a
resumed run sees the same batches as an uninterrupted one."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernos.storage.durable import fsync_dir, fsync_tree

from .config import TrainConfig

IGNORE = -100
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_MAMBA = ("in_proj", "x_proj", "dt_proj", "out_proj")


class DataError(ValueError):
    pass


# -- encoding ------------------------------------------------------------------------------------------
def chat_ids(tok, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
    """The tokens of a conversation as the kernel would prompt it: tools, tool calls and results written the
    way serving writes them (`kernos.kernel.llm.tool_calls`)."""
    from ..llm.tool_calls import chat_template_input, tool_defs

    if not getattr(tok, "chat_template", None):
        text = "".join(m["content"] + "\n" for m in messages)
        return list(tok.encode(text, add_special_tokens=False))
    messages, kwargs = chat_template_input(tok, messages, tool_defs(tools or []))
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode(tok, example: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels on assistant tokens only; the end is kept when too long."""
    messages = example.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
    ):
        raise DataError("an example needs 'messages': a list of {role, content}")
    if messages[-1]["role"] != "assistant":
        raise DataError("an example's last message must be the assistant's reply")
    tools = example.get("tools")
    full = chat_ids(tok, messages, False, tools)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_ids(tok, messages[:i], True, tools) if i else []
        upto = chat_ids(tok, messages[: i + 1], False, tools)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise DataError("the chat template does not extend turn by turn; cannot mask non-assistant tokens")
        labels[len(before) : len(upto)] = full[len(before) : len(upto)]
    return full[-max_length:], labels[-max_length:]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (i, lab) in enumerate(batch):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return ids, mask, labels


# -- the model -----------------------------------------------------------------------------------------
def lora_targets(model, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters): attention, MLP and Mamba projections that are Linear layers,
    plus fused MoE expert weights (which are parameters, not Linear modules)."""
    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    modules = cfg.target_modules or [n for n in _ATTENTION + _MLP + _MAMBA if n in linear]
    if not modules:
        raise DataError(f"no LoRA target modules found; give target_modules (Linear layers: {sorted(linear)})")
    params = []
    if cfg.target_experts:
        for name, mod in model.named_modules():
            if name.endswith("experts") and not isinstance(mod, torch.nn.ModuleList):
                for pname, _ in mod.named_parameters(recurse=False):
                    suffix = ".".join(name.split(".")[-2:] + [pname])
                    if suffix not in params:
                        params.append(suffix)
    return modules, params


def load_base(model_path: Path, dtype=torch.float32, start: Path | None = None):
    """The model a job trains on: the base, or (`start`: an adapter folder) the base with that adapter merged in
    (`combine.py`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    if start is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start).merge_and_unload()
    return model, tok


def lora_config(model, cfg: TrainConfig):
    from peft import LoraConfig

    modules, params = lora_targets(model, cfg)
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules,
        target_parameters=params or None,
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: TrainConfig):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg))


# -- evaluation ----------------------------------------------------------------------------------------
def _norm(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .!")


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], cfg: TrainConfig) -> dict:
    """Mean loss on assistant tokens and task accuracy: the greedy reply equals the reference reply, or
    contains the example's "answer" when it has one."""
    model.eval()
    rows = rows[: cfg.eval_limit]
    if not rows:
        return {"loss": None, "accuracy": None, "examples": 0}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id
    total, count, correct = 0.0, 0, 0
    for ex in rows:
        ids, labels = encode(tok, ex, cfg.max_length)
        x, m, y = collate([(ids, labels)], pad)
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
        tgt = y[:, 1:]
        n = int((tgt != IGNORE).sum())
        if n:
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum"
                )
            )
            count += n
        prompt = chat_ids(tok, ex["messages"][:-1], True)[-cfg.max_length :]
        reference = ex["messages"][-1]["content"]
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=cfg.eval_max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        reply = tok.decode(out[0, len(prompt) :], skip_special_tokens=True)
        answer = ex.get("answer")
        ok = _norm(answer) in _norm(reply) if isinstance(answer, str) and answer else _norm(reply) == _norm(reference)
        correct += int(ok)
    return {"loss": total / count if count else None, "accuracy": correct / len(rows), "examples": len(rows)}


# -- training ------------------------------------------------------------------------------------------
@dataclass
class Progress:
    step: int
    total: int
    loss: float
    steps_per_s: float
    eta_s: float


def _order(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(idx)
    return idx


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate * max(0.1, 1 - 0.9 * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))


def total_steps(n_train: int, cfg: TrainConfig) -> int:
    return cfg.max_steps or math.ceil(n_train / cfg.batch_size) * cfg.epochs


def _save_checkpoint(model, opt, state: dict, ckpt: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, tmp / "adapter.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    fsync_tree(tmp)
    old = ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    fsync_dir(ckpt.parent)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(model, opt, ckpt: Path) -> dict | None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (ckpt / "state.json").exists():
        old = ckpt.with_name(ckpt.name + ".old")  # a crash between the two renames
        if not (old / "state.json").exists():
            return None
        ckpt = old
    set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


class SFT:
    """The supervised objective: next-token loss on assistant turns; `evaluate` above for held-out numbers.
    Another objective (GRPO) has the same three methods."""
    name = "sft"

    def prepare(self, tok, rows: list[dict], cfg: TrainConfig) -> list:
        try:
            data = [encode(tok, ex, cfg.max_length) for ex in rows]
        except DataError as e:
            raise DataError(f"training data: {e}") from e
        data = [d for d in data if any(x != IGNORE for x in d[1])]
        if not data:
            raise DataError("no training example has assistant tokens to learn")
        return data

    def loss(self, model, batch: list, pad: int):
        x, m, y = collate(batch, pad)
        return model(input_ids=x, attention_mask=m, labels=y).loss

    def evaluate(self, model, tok, rows: list[dict], cfg: TrainConfig) -> dict:
        return evaluate(model, tok, rows, cfg)


def train(
    model_path: Path,
    train_rows: list[dict],
    eval_rows: list[dict],
    cfg: TrainConfig,
    out: Path,
    report=lambda event: None,
    should_stop=lambda: False,
    objective=None,
    start: Path | None = None,
) -> dict:
    """Train a LoRA adapter into `out/adapter` by `objective` (default: SFT); evaluate base and tuned on
    `eval_rows`. Resumes from `out/checkpoint`. Returns the result dict, or {"cancelled": True, ...} when
    `should_stop()` turned true (after a checkpoint at that step). `start`: an adapter to continue from (merged
    into the base: "base" numbers are then its own)."""
    objective = objective or SFT()
    torch.manual_seed(cfg.seed)
    model, tok = load_base(Path(model_path), start=start)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = objective.prepare(tok, train_rows, cfg)
    model = add_lora(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint"
    state = _load_checkpoint(model, opt, ckpt) or {"step": 0, "losses": [], "base": None}
    total = total_steps(len(data), cfg)
    if state["base"] is None:
        with model.disable_adapter():
            state["base"] = objective.evaluate(model, tok, eval_rows, cfg)
        report({"event": "eval", "phase": "base", **state["base"]})
    elif state["step"]:
        report({"event": "resumed", "step": state["step"], "total": total})
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    started, start_step = time.perf_counter(), state["step"]
    while state["step"] < total:
        if should_stop():
            _save_checkpoint(model, opt, state, ckpt)
            return {"cancelled": True, "step": state["step"], "total": total}
        step = state["step"]
        epoch, b = divmod(step, per_epoch)
        order = _order(len(data), cfg.seed, epoch)
        batch = [data[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
        model.train()
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step, total)
        loss = objective.loss(model, batch, pad)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(round(loss.item(), 5))
        done = state["step"] - start_step
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        report(
            {
                "event": "progress",
                "step": state["step"],
                "total": total,
                "loss": loss.item(),
                "steps_per_s": rate,
                "eta_s": (total - state["step"]) / rate if rate else None,
            }
        )
        if state["step"] % cfg.checkpoint_every == 0 and state["step"] < total:
            _save_checkpoint(model, opt, state, ckpt)  # its time counts in the rate: it is part of the job
    tuned = objective.evaluate(model, tok, eval_rows, cfg)
    report({"event": "eval", "phase": "tuned", **tuned})
    adapter = out / "adapter"
    tmp = out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(adapter, ignore_errors=True)
    tmp.rename(adapter)
    return {
        "cancelled": False,
        "step": state["step"],
        "total": total,
        "base": state["base"],
        "tuned": tuned,
        "train_loss_first": state["losses"][0] if state["losses"] else None,
        "train_loss_last": state["losses"][-1] if state["losses"] else None,
        "adapter": str(adapter),
        "examples": len(data),
        "method": objective.name,
    }
