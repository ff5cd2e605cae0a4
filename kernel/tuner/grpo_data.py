"""GRPO data sets: groups of replies sampled for one prompt, each scored by a verifiable reward, turned into
group-relative advantages (DeepSeekMath's GRPO: a reply's reward less its group's mean, over the group's
standard deviation). Pure functions, like `datasets.py`; the sampling and scoring run in the syscall.

A row is a chat example whose last message is one sampled reply, with "reward" and "advantage"; rows of one
prompt share their "episode" key (the prompt's hash), so the split keeps a group on one side. A group whose
replies all scored the same has no advantage to learn from and is left out (counted in the card)."""
from __future__ import annotations

import statistics

from .datasets import Episode, Sample, prompt_key, split, successful

MIN_STD = 1e-4


def references(episodes: list[Episode], min_reward: float | None) -> dict[str, str]:
    """Prompt key -> its reference answer: the latest correction, else the latest successful reply."""
    out: dict[str, str] = {}
    corrected: set[str] = set()
    for ep in episodes:
        key = prompt_key(ep.messages)
        if ep.preferred:
            out[key] = ep.preferred
            corrected.add(key)
        elif key not in corrected and successful(ep, min_reward) and ep.reply.strip():
            out[key] = ep.reply
    return out


def reference_calls(episodes: list[Episode], min_reward: float | None) -> dict[str, list[dict]]:
    """Prompt key -> the tool calls of its latest successful reply that made any (a correction is text)."""
    return {prompt_key(ep.messages): ep.tool_calls for ep in episodes
            if ep.tool_calls and not ep.preferred and successful(ep, min_reward)}


def build_grpo(groups: list[tuple[str, list[dict], list[tuple[Sample, float | None]]]], eval_fraction: float = 0.1,
               tools: dict[str, dict] | None = None):
    """(train, eval, card) from (prompt key, messages, [(reply, reward or None)]) groups; `tools`: the tools each
    prompt offered (its rows keep them, and its replies' tool calls)."""
    tools = tools or {}
    rows, scored_all = [], []
    dropped = {"unscored": 0, "too_few_scored": 0, "no_signal": 0}
    kept_groups = 0
    for key, messages, samples in groups:
        scored = [(reply, r) for reply, r in samples if r is not None and not reply.empty]
        dropped["unscored"] += len(samples) - len(scored)
        scored_all += [r for _, r in scored]
        if len(scored) < 2:
            dropped["too_few_scored"] += 1
            continue
        rewards = [r for _, r in scored]
        mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
        if std < MIN_STD:
            dropped["no_signal"] += 1
            continue
        kept_groups += 1
        for reply, r in scored:
            rows.append({"messages": messages + [reply.message()], "reward": r, "advantage": (r - mean) / std,
                         "episode": key, **({"tools": tools[key]["tools"]} if key in tools else {})})
    train, evals = split(rows, eval_fraction)
    k = max((len(s) for _, _, s in groups), default=0)
    card = {"kind": "grpo", "prompts": len(groups), "samples_per_prompt": k, "groups": kept_groups,
            "tool_use": sum(1 for r in rows if r.get("tools")),
            "train": len(train), "eval": len(evals), "dropped": dropped,
            "mean_reward": statistics.fmean(scored_all) if scored_all else None,
            "solved_share": (sum(1 for r in scored_all if r > 0) / len(scored_all)) if scored_all else None,
            "advantage": "(reward - group mean) / group standard deviation",
            "split": {"by": "prompt (lowest sha256): a group on one side"},
            "loss": "GRPO: clipped policy ratio x advantage per reply token, minus beta x KL to the base model"}
    return train, evals, card
