"""Data-set builders: pure functions from traced generations and their outcomes to training examples.

SFT keeps successful episodes (success=true, or reward >= min_reward when a reward was given): each is the
chat the agent sent plus the reply it got, as {"messages": [...]}. Exact duplicates are removed; the
train/eval split is by episode and deterministic (a hash of the request id), so an episode never lands
in both halves and rebuilding gives the same split."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass
class Episode:
    request_id: str
    messages: list[dict]            # what the agent sent (chat form); raw prompts become one user turn
    reply: str
    model: str
    rewards: list[float] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)


def episodes_from_traces(traces, outcomes: dict[str, list[dict]]) -> list[Episode]:
    out = []
    for t in traces:
        if t.kind != "llm.generate" or t.status != "OK":
            continue
        req, resp = t.request, t.response
        rid = resp.get("request_id")
        if not rid:
            continue
        messages = req.get("messages") or [{"role": "user", "content": req.get("prompt", "")}]
        ep = Episode(rid, [{"role": m.get("role", "user"), "content": m.get("content", "")} for m in messages],
                     resp.get("text", ""), resp.get("model", ""))
        for o in outcomes.get(rid, []):
            if o.get("reward") is not None:
                ep.rewards.append(float(o["reward"]))
            if o.get("success") is not None:
                ep.successes.append(bool(o["success"]))
        out.append(ep)
    return out


def successful(ep: Episode, min_reward: float | None) -> bool:
    if ep.successes and not all(ep.successes):
        return False
    if ep.successes:
        return True
    return bool(ep.rewards) and min_reward is not None and min(ep.rewards) >= min_reward


def in_eval(request_id: str, eval_fraction: float) -> bool:
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction


def build_sft(episodes: list[Episode], min_reward: float | None = None, eval_fraction: float = 0.1):
    """(train, eval, card) from episodes."""
    seen, train, evals = set(), [], []
    dropped = {"unsuccessful": 0, "empty_reply": 0, "duplicate": 0}
    for ep in episodes:
        if not successful(ep, min_reward):
            dropped["unsuccessful"] += 1
            continue
        if not ep.reply.strip():
            dropped["empty_reply"] += 1
            continue
        example = {"messages": ep.messages + [{"role": "assistant", "content": ep.reply}]}
        key = hashlib.sha256(json.dumps(example, sort_keys=True).encode()).hexdigest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        (evals if in_eval(ep.request_id, eval_fraction) else train).append(dict(example, episode=ep.request_id))
    card = {"kind": "sft", "episodes_seen": len(episodes), "train": len(train), "eval": len(evals),
            "dropped": dropped, "filters": {"min_reward": min_reward, "success": "all outcomes true if any given"},
            "split": {"by": "episode (sha256 of request id)", "eval_fraction": eval_fraction},
            "models": sorted({ep.model for ep in episodes if ep.model}),
            "loss": "assistant turns only (the trainer masks the rest)"}
    return train, evals, card
