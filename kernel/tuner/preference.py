"""Preference fine-tuning (DPO, KTO) with TRL's trainers, on the job contract of `train.train`: progress
events, a checkpoint to resume from, cancel at a step, base and tuned evaluations, `out/adapter`.

TRL's DPOTrainer and KTOTrainer own the losses, the reference model (the served base: the LoRA adapter
disabled) and the optimisation loop. Examples are tokenized here, not by TRL, with the kernel's own chat
rendering (`train.chat_ids`: tools and tool calls written as serving writes them), so the model learns on
exactly the tokens it is prompted with. The held-out evaluation is computed here too, with the same numbers
for the base and the adapter:
- DPO: loss = the DPO loss on held-out pairs (ln 2 for the base, whose log-ratios are 0); accuracy = share
  of pairs whose chosen reply the model finds more likely per token than the rejected one.
- KTO: loss = the KTO loss on held-out replies with the KL baseline at 0 (0.5 for the base); no accuracy.
Checkpoints are TRL's (`out/checkpoint/checkpoint-N`), each marked complete once written and synced; an
unmarked one (a crash while saving) is removed before resuming."""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from kernos.storage.durable import fsync_dir, fsync_tree

from .config import TrainConfig
from .preference_data import check_rows

TRL_METHODS = ("dpo", "kto")
from .train import DataError, chat_ids, load_base, lora_config

COMPLETE = "kernos-complete"


# -- data ----------------------------------------------------------------------------------------------
def tokenize(tok, row: dict, method: str, max_length: int) -> dict:
    """prompt_ids and the completion ids (DPO: chosen_ids, rejected_ids; KTO: completion_ids, label; GRPO:
    completion_ids, advantage). A too
    long example keeps its completions whole (each cut to half of max_length at most) and its prompt's end."""
    messages, tools = row["messages"], row.get("tools")
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("an example's last message must be the assistant's reply")
    prompt = chat_ids(tok, messages[:-1], True, tools)
    if not prompt:
        raise DataError("an example needs a prompt before its reply")

    def completion(reply: dict) -> list[int]:
        full = chat_ids(tok, messages[:-1] + [reply], False, tools)
        if full[: len(prompt)] != prompt:
            raise DataError("the chat template does not extend the prompt with the reply; cannot find its tokens")
        return full[len(prompt):][: max_length // 2] if len(full) > max_length else full[len(prompt):]

    if method == "dpo":
        out = {"chosen_ids": completion(messages[-1]), "rejected_ids": completion(row["rejected"])}
    elif method == "kto":
        out = {"completion_ids": completion(messages[-1]), "label": bool(row["label"])}
    else:                       # grpo: a sampled reply and its advantage in its group
        out = {"completion_ids": completion(messages[-1]), "advantage": float(row["advantage"])}
    room = max_length - max(len(v) for v in out.values() if isinstance(v, list))
    out["prompt_ids"] = prompt[-max(1, room):]
    return out


def _dataset(rows: list[dict], method: str, batch_size: int, seed: int):
    from datasets import Dataset

    if method == "kto":
        # KTO estimates its KL baseline from mismatched (prompt, completion) pairs of one batch: each example's
        # completion goes with its neighbour's prompt (TRL's rotation by one, done here on our tokens); TRL
        # reads the batches in order, so the order is shuffled once, by the seed.
        rows = list(rows)
        random.Random(seed).shuffle(rows)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            for j, r in enumerate(chunk):
                r["KL_completion_ids"] = chunk[j - 1]["completion_ids"]
    return Dataset.from_list(rows)


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def _logp(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum())


def _keys(method: str) -> tuple[str, ...]:
    return ("chosen_ids", "rejected_ids") if method == "dpo" else ("completion_ids",)


def logps(model, examples: list[dict], method: str) -> list[list[float]]:
    model.eval()
    return [[_logp(model, ex["prompt_ids"], ex[k]) for k in _keys(method)] for ex in examples]


def score(examples: list[dict], policy: list[list[float]], ref: list[list[float]], method: str, beta: float) -> dict:
    """The held-out numbers of module doc, from the log-probabilities of the policy and the reference."""
    if not examples:
        return {"loss": None, "accuracy": None, "examples": 0}
    losses, right = [], 0
    for ex, p, r in zip(examples, policy, ref):
        if method == "dpo":
            margin = beta * ((p[0] - r[0]) - (p[1] - r[1]))
            losses.append(-torch.nn.functional.logsigmoid(torch.tensor(margin)).item())
            right += p[0] / len(ex["chosen_ids"]) > p[1] / len(ex["rejected_ids"])
        else:
            sign = 1.0 if ex["label"] else -1.0
            losses.append(1.0 - 1.0 / (1.0 + math.exp(-sign * beta * (p[0] - r[0]))))
    return {"loss": sum(losses) / len(losses), "accuracy": right / len(examples) if method == "dpo" else None,
            "examples": len(examples)}


# -- checkpoints ---------------------------------------------------------------------------------------
def _last_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (a crash while saving) are removed."""
    if not root.is_dir():
        return None
    done = []
    for d in root.glob("checkpoint-*"):
        if (d / COMPLETE).exists():
            done.append(d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    return max(done, key=lambda d: int(d.name.rsplit("-", 1)[1]), default=None)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.rename(path)
    fsync_dir(path.parent)


# -- training ------------------------------------------------------------------------------------------
def _trainer(method: str, model, tok, train_ds, cfg: TrainConfig, out: Path, steps: int, weights):
    import trl

    common = dict(
        output_dir=str(out / "checkpoint"), learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
        lr_scheduler_type="linear", max_grad_norm=1.0, seed=cfg.seed, data_seed=cfg.seed, beta=cfg.beta,
        max_length=cfg.max_length, logging_strategy="steps", logging_steps=1, save_strategy="steps",
        save_steps=cfg.checkpoint_every, save_total_limit=2, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=True, bf16=False, fp16=False,
    )
    if method == "dpo":
        args, cls = trl.DPOConfig(**common), trl.DPOTrainer
    else:
        args, cls = trl.KTOConfig(**common, desirable_weight=weights[0], undesirable_weight=weights[1]), trl.KTOTrainer
    return _own_tokens(cls)(model=model, args=args, train_dataset=train_ds, processing_class=tok,
               peft_config=lora_config(model, cfg))


@functools.cache
def _own_tokens(base):
    class OwnTokens(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset          # tokenized by `tokenize`, with the kernel's chat rendering
    OwnTokens.__name__ = f"Kernos{base.__name__}"
    return OwnTokens


def train(method: str, model_path: Path, train_rows: list[dict], eval_rows: list[dict], cfg: TrainConfig, out: Path,
          report=lambda event: None, should_stop=lambda: False, start: Path | None = None) -> dict:
    """Train a LoRA adapter by `method` ("dpo" or "kto") into `out/adapter`; the same result as `train.train`."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if method not in TRL_METHODS:
        raise DataError(f"method '{method}': one of {TRL_METHODS}")
    for rows, name in ((train_rows, "training"), (eval_rows, "held-out")):
        if why := check_rows(rows, method):
            raise DataError(f"{name} data: {why}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, tok = load_base(Path(model_path), start=start)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    try:
        data = [tokenize(tok, r, method, cfg.max_length) for r in train_rows]
        held = [tokenize(tok, r, method, cfg.max_length) for r in eval_rows[: cfg.eval_limit]]
    except DataError as e:
        raise DataError(f"data: {e}") from e
    if method == "kto":
        n_good = sum(d["label"] for d in data)
        if not 0 < n_good < len(data):
            raise DataError(f"kto needs desirable and undesirable replies; the training data has {n_good} desirable "
                            f"of {len(data)}")
        weights = (max(1.0, (len(data) - n_good) / n_good), max(1.0, n_good / (len(data) - n_good)))
        if cfg.batch_size < 2:
            raise DataError("kto estimates its KL baseline within a batch: batch_size must be 2 or more")
    else:
        weights = (1.0, 1.0)
    total = cfg.max_steps or math.ceil(len(data) / cfg.batch_size) * cfg.epochs
    base_file = out / "base_eval.json"
    if base_file.exists():
        saved = json.loads(base_file.read_text())
        base, ref = saved["base"], saved["ref"]
    else:
        ref = logps(model, held, method)
        base = score(held, ref, ref, method, cfg.beta)
        _write_json(base_file, {"base": base, "ref": ref})
        report({"event": "eval", "phase": "base", **base})
    trainer = _trainer(method, model, tok, _dataset(data, method, cfg.batch_size, cfg.seed), cfg, out, total, weights)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    losses: list[float] = []
    state = {"cancelled": False, "started": time.perf_counter(), "from": 0}

    class Events(TrainerCallback):
        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 5))
                done = st.global_step - state["from"]
                elapsed = time.perf_counter() - state["started"]
                rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
                report({"event": "progress", "step": st.global_step, "total": total, "loss": float(logs["loss"]),
                        "steps_per_s": rate, "eta_s": (total - st.global_step) / rate if rate else None})

        def on_step_end(self, args, st, control, **kw):
            if should_stop() and st.global_step < total:
                state["cancelled"] = True
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, st, control, **kw):
            d = Path(args.output_dir) / f"checkpoint-{st.global_step}"
            fsync_tree(d)
            (d / COMPLETE).touch()
            fsync_dir(d)

    trainer.add_callback(Events())
    last = _last_checkpoint(out / "checkpoint")
    if last is not None:
        state["from"] = int(last.name.rsplit("-", 1)[1])
        report({"event": "resumed", "step": state["from"], "total": total})
    if should_stop():
        return {"cancelled": True, "step": state["from"], "total": total}
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    step = trainer.state.global_step
    if state["cancelled"]:
        return {"cancelled": True, "step": step, "total": total}
    model = trainer.model
    tuned = score(held, logps(model, held, method), ref, method, cfg.beta)
    report({"event": "eval", "phase": "tuned", **tuned})
    adapter, tmp = out / "adapter", out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(adapter, ignore_errors=True)
    tmp.rename(adapter)
    return {"cancelled": False, "step": step, "total": total, "base": base, "tuned": tuned, "method": method,
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "adapter": str(adapter), "examples": len(data)}
