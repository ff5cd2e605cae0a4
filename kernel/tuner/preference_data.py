"""Preference data sets from traced episodes and their feedback: pure functions, like `datasets.py`.

- DPO pairs (chosen, rejected) for one prompt: every corrected reply (the preferred reply beats the generated
  one), and replies to the same prompt whose feedback scores differ (the best-scored reply beats each worse
  one, up to `max_pairs_per_prompt`). A reply's score is the mean of its rewards, success counting 1 and
  failure 0.
- KTO examples, unpaired: a reply labelled desirable or undesirable. Success flags decide first (all true:
  desirable; any false: undesirable); then rewards: at or above `min_reward` is desirable, below it not;
  without `min_reward`, the sign of the mean reward decides (thumbs up +1, down -1; 0 is no label). A
  corrected reply is undesirable and its correction desirable.

A row is an ordinary chat example whose last message is the desirable (DPO: chosen) reply, so an SFT job can
train on it too; a DPO row adds "rejected" (an assistant message), a KTO row "label". Rows of one prompt
share their "episode" key (the prompt's hash), so the train/eval split never puts one prompt in both halves."""
from __future__ import annotations

import hashlib
import json

from .datasets import Episode, prompt_key, split

METHODS = ("dpo", "kto", "grpo")     # the methods that need their own rows; "sft" trains on any data set


def score(ep: Episode) -> float | None:
    scores = ep.rewards + [1.0 if s else 0.0 for s in ep.successes]
    return sum(scores) / len(scores) if scores else None


def label(ep: Episode, min_reward: float | None) -> bool | None:
    if ep.successes:
        return all(ep.successes)
    if not ep.rewards:
        return None
    mean = sum(ep.rewards) / len(ep.rewards)
    if min_reward is not None:
        return mean >= min_reward
    return True if mean > 0 else False if mean < 0 else None


def _reply(text: str, calls: list[dict]) -> dict:
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _prompt(ep: Episode) -> str:
    return prompt_key(ep.messages + [{"tools": ep.tools}])


def _card(kind: str, episodes, train, evals, **extra) -> dict:
    return {"kind": kind, "episodes_seen": len(episodes), "train": len(train), "eval": len(evals), **extra,
            "split": {"by": "prompt (lowest sha256): all rows of one prompt on one side"},
            "models": sorted({ep.model for ep in episodes if ep.model}),
            "tool_use": sum(1 for ex in train + evals if ex.get("tools"))}


def build_dpo(episodes: list[Episode], eval_fraction: float = 0.1, max_pairs_per_prompt: int = 4):
    """(train, eval, card) of preference pairs."""
    rows, seen = [], set()
    sources = {"correction": 0, "reward": 0}
    dropped = {"duplicate": 0, "same_reply": 0}

    def add(ep: Episode, chosen: dict, rejected: dict, source: str) -> None:
        if chosen["content"].strip() == rejected["content"].strip() and chosen.get("tool_calls") == rejected.get(
                "tool_calls"):
            dropped["same_reply"] += 1
            return
        k = _key(_prompt(ep), chosen, rejected)
        if k in seen:
            dropped["duplicate"] += 1
            return
        seen.add(k)
        sources[source] += 1
        rows.append({"messages": ep.messages + [chosen], "rejected": rejected, "source": source,
                     "episode": _prompt(ep), **({"tools": ep.tools} if ep.tools else {})})

    for ep in episodes:
        if ep.preferred:
            add(ep, _reply(ep.preferred, []), _reply(ep.reply, ep.tool_calls), "correction")
    groups: dict[str, dict[str, list]] = {}
    for ep in episodes:             # replies of one prompt, each with all the scores it got
        s = score(ep)
        if s is None or (not ep.reply.strip() and not ep.tool_calls):
            continue
        replies = groups.setdefault(_prompt(ep), {})
        replies.setdefault(_key(ep.reply.strip(), ep.tool_calls), [ep, []])[1].append(s)
    for replies in groups.values():
        ranked = sorted(((sum(v) / len(v), i, ep) for i, (ep, v) in enumerate(replies.values())),
                        key=lambda t: (-t[0], t[1]))
        best = ranked[0]
        worse = [r for r in ranked[1:] if r[0] < best[0]]
        for _, _, ep in worse[::-1][:max_pairs_per_prompt]:        # the worst ones first
            add(best[2], _reply(best[2].reply, best[2].tool_calls), _reply(ep.reply, ep.tool_calls), "reward")
    train, evals = split(rows, eval_fraction)
    card = _card("dpo", episodes, train, evals, pairs=len(rows), sources=sources, dropped=dropped,
                 rule={"correction": "the preferred reply beats the generated one",
                       "reward": f"the best-scored reply of a prompt beats each worse-scored one (at most "
                                 f"{max_pairs_per_prompt} per prompt); score: mean reward, success 1, failure 0"},
                 loss="DPO (sigmoid) on the chosen and rejected replies' tokens; reference: the served base model")
    return train, evals, card


def build_kto(episodes: list[Episode], min_reward: float | None = None, eval_fraction: float = 0.1):
    """(train, eval, card) of replies labelled desirable (True) or undesirable (False)."""
    rows: list[dict] = []
    seen: dict[str, dict | None] = {}
    dropped = {"unlabelled": 0, "duplicate": 0, "conflicting": 0}

    def add(ep: Episode, reply: dict, good: bool) -> None:
        k = _key(_prompt(ep), reply)
        if k in seen:
            prev = seen[k]
            if prev is None or prev["label"] != good:   # one reply both up- and down-voted: no signal, drop it
                if prev is not None:
                    rows.remove(prev)
                    seen[k] = None
                dropped["conflicting"] += 1
            else:
                dropped["duplicate"] += 1
            return
        row = {"messages": ep.messages + [reply], "label": good, "episode": _prompt(ep),
               **({"tools": ep.tools} if ep.tools else {})}
        seen[k] = row
        rows.append(row)

    for ep in episodes:
        if ep.preferred:
            add(ep, _reply(ep.preferred, []), True)
            if ep.preferred.strip() != ep.reply.strip():
                add(ep, _reply(ep.reply, ep.tool_calls), False)
            continue
        good = label(ep, min_reward)
        if good is None or (not ep.reply.strip() and not ep.tool_calls):
            dropped["unlabelled"] += 1
            continue
        add(ep, _reply(ep.reply, ep.tool_calls), good)
    train, evals = split(rows, eval_fraction)
    desirable = sum(1 for r in rows if r["label"])
    card = _card("kto", episodes, train, evals, desirable=desirable, undesirable=len(rows) - desirable,
                 dropped=dropped,
                 rule={"success": "all success flags true: desirable; any false: undesirable",
                       "reward": (f"mean reward >= {min_reward}: desirable, else undesirable" if min_reward is not None
                                  else "mean reward > 0: desirable, < 0: undesirable, 0: no label"),
                       "correction": "the preferred reply desirable, the generated one undesirable"},
                 loss="KTO on each reply's tokens; reference: the served base model")
    return train, evals, card


def check_rows(rows: list[dict], method: str) -> str | None:
    """Why the rows cannot train `method`, or None."""
    for n, row in enumerate(rows, 1):
        if method == "dpo":
            rej = row.get("rejected")
            if not (isinstance(rej, dict) and rej.get("role") == "assistant" and isinstance(rej.get("content"), str)):
                return f"row {n}: dpo needs 'rejected': an assistant message (build the data set with kind 'dpo')"
        elif method == "kto" and not isinstance(row.get("label"), bool):
            return f"row {n}: kto needs 'label': true or false (build the data set with kind 'kto')"
        elif method == "grpo" and (isinstance(row.get("advantage"), bool)
                                   or not isinstance(row.get("advantage"), (int, float))):
            return f"row {n}: grpo needs 'advantage': a number (build the data set with kind 'grpo')"
    return None
