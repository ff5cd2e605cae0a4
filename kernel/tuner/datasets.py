"""Data-set builders: pure functions from traced generations and their outcomes to training examples.

- SFT keeps successful episodes (success=true, or reward >= min_reward when a reward was given): each is
  the chat the agent sent plus the reply it got, as {"messages": [...]}. An episode with a preferred reply
  (feedback) learns that reply instead, and also yields a preferred/rejected pair.
- Reward-ranked (LMFlow's RAFT): per distinct prompt, k sampled answers are scored by a reward and the
  best is kept when it clears min_reward.
- Retrieval-augmented (the RAFT recipe for domain RAG): a question with its oracle document plus sampled
  distractors (a share with distractors only); the target quotes the oracle's relevant sentence, then
  gives the answer.

Exact duplicates are removed; the train/eval split is by episode (or question) and deterministic (the
lowest hashes are held out), so one never lands in both halves and rebuilding gives the same split."""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field


@dataclass
class Episode:
    request_id: str
    messages: list[dict]            # what the agent sent (chat form); raw prompts become one user turn
    reply: str
    model: str
    rewards: list[float] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)
    preferred: str | None = None    # the latest preferred reply given as feedback
    tools: list[dict] = field(default_factory=list)       # the request's tools ({"name", "parameters_json", ...})
    tool_calls: list[dict] = field(default_factory=list)  # the reply's calls ({"id", "name", "arguments"})
    tool_choice: str = ""                                 # the request's ("": auto)


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
        ep = Episode(rid, [_message(m) for m in messages], resp.get("text", ""), resp.get("model", ""),
                     tools=list(req.get("tools") or []), tool_calls=list(resp.get("tool_calls") or []),
                     tool_choice=req.get("tool_choice") or "")
        for o in outcomes.get(rid, []):
            if o.get("reward") is not None:
                ep.rewards.append(float(o["reward"]))
            if o.get("success") is not None:
                ep.successes.append(bool(o["success"]))
            if o.get("preferred"):
                ep.preferred = o["preferred"]
        out.append(ep)
    return out


def _message(m: dict) -> dict:
    """A traced message as a data set keeps it: role and content, and its tool calls or the call it answers."""
    out = {"role": m.get("role", "user"), "content": m.get("content", "")}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.get("id", ""), "name": c.get("name", ""), "arguments": c.get("arguments", "")}
                             for c in m["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def successful(ep: Episode, min_reward: float | None) -> bool:
    if ep.successes and not all(ep.successes):
        return False
    if ep.successes:
        return True
    return bool(ep.rewards) and min_reward is not None and min(ep.rewards) >= min_reward


def split(examples: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval) by episode: the round(fraction x n) episodes (distinct "episode" keys) that hash lowest
    are held out with all their examples, at least one when the fraction is above 0 and there are two or
    more. A fixed hash threshold would be stabler across rebuilds but can leave a small data set with no
    held-out examples at all."""
    keys = sorted({ex["episode"] for ex in examples}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    n = len(keys)
    k = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        k = max(k, 1)
    held = set(keys[:k])
    return [ex for ex in examples if ex["episode"] not in held], [ex for ex in examples if ex["episode"] in held]


def build_sft(episodes: list[Episode], min_reward: float | None = None, eval_fraction: float = 0.1):
    """(train, eval, card) from episodes."""
    seen, kept = set(), []
    dropped = {"unsuccessful": 0, "empty_reply": 0, "duplicate": 0}
    corrected = 0
    for ep in episodes:
        target = ep.preferred or ep.reply
        calls = [] if ep.preferred else ep.tool_calls     # a preferred reply is text
        if ep.preferred:
            corrected += 1
        elif not successful(ep, min_reward):
            dropped["unsuccessful"] += 1
            continue
        if not target.strip() and not calls:
            dropped["empty_reply"] += 1
            continue
        reply = {"role": "assistant", "content": target, **({"tool_calls": calls} if calls else {})}
        example = {"messages": ep.messages + [reply], **({"tools": ep.tools} if ep.tools else {})}
        key = hashlib.sha256(json.dumps(example, sort_keys=True).encode()).hexdigest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(dict(example, episode=ep.request_id))
    train, evals = split(kept, eval_fraction)
    card = {"kind": "sft", "episodes_seen": len(episodes), "train": len(train), "eval": len(evals),
            "dropped": dropped, "corrected": corrected,
            "filters": {"min_reward": min_reward, "success": "all outcomes true if any given",
                        "preferred": "an episode with a preferred reply learns it"},
            "split": {"by": "episode (lowest sha256 of request id)", "eval_fraction": eval_fraction},
            "models": sorted({ep.model for ep in episodes if ep.model}),
            "tool_use": sum(1 for ex in kept if ex.get("tools")),
            "loss": "assistant turns only (the trainer masks the rest); tool calls written as serving writes them"}
    return train, evals, card


def build_pairs(episodes: list[Episode]) -> list[dict]:
    """Preferred/rejected pairs: each episode whose reply was corrected by a preferred one."""
    return [{"messages": ep.messages, "chosen": ep.preferred, "rejected": ep.reply, "episode": ep.request_id}
            for ep in episodes if ep.preferred and ep.preferred.strip() != ep.reply.strip()]


# -- reward-ranked fine-tuning (RAFT, LMFlow) -----------------------------------------------------------
def prompt_key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Sample:
    """One sampled reply: its text and (a prompt that offered tools) its tool calls, as JSON ("": none)."""
    text: str
    calls: str = ""

    @classmethod
    def of(cls, text: str, tool_calls: list[dict] | None = None) -> Sample:
        calls = [{"id": c.get("id", ""), "name": c.get("name", ""), "arguments": c.get("arguments", "")}
                 for c in tool_calls or []]
        return cls(text, json.dumps(calls) if calls else "")

    @property
    def tool_calls(self) -> list[dict]:
        return json.loads(self.calls) if self.calls else []

    @property
    def empty(self) -> bool:
        return not self.text.strip() and not self.calls

    def message(self) -> dict:
        """The reply as the assistant's message of a training example."""
        return {"role": "assistant", "content": self.text, **({"tool_calls": self.tool_calls} if self.calls else {})}

    def shown(self) -> str:
        """The reply as a judge reads it: its text, then its calls written name(arguments)."""
        calls = "".join(f"\n[calls {c['name']}({c['arguments']})]" for c in self.tool_calls)
        return self.text + calls


def prompt_tools(episodes: list[Episode]) -> dict[str, dict]:
    """Prompt key -> {"tools", "tool_choice"} its request offered (first seen), for prompts that offered tools."""
    out: dict[str, dict] = {}
    for ep in episodes:
        if ep.tools:
            out.setdefault(prompt_key(ep.messages), {"tools": ep.tools, "tool_choice": ep.tool_choice or "auto"})
    return out


def distinct_prompts(episodes: list[Episode]) -> list[tuple[str, list[dict]]]:
    """(key, messages) of each distinct prompt, first seen first."""
    seen: dict[str, list[dict]] = {}
    for ep in episodes:
        seen.setdefault(prompt_key(ep.messages), ep.messages)
    return list(seen.items())


def regex_reward(pattern: str):
    rx = re.compile(pattern)
    return lambda messages, answer: 1.0 if rx.search(answer.text) else 0.0


def feedback_reward(episodes: list[Episode]):
    """The mean stored reward (success counts 1/0) of traced replies identical to the answer, for the same
    prompt; 0 for an answer nobody rated."""
    table: dict[tuple[str, str], list[float]] = {}
    for ep in episodes:
        scores = ep.rewards + [1.0 if s else 0.0 for s in ep.successes]
        if scores:
            table.setdefault((prompt_key(ep.messages), ep.reply.strip()), []).extend(scores)
    def reward(messages, answer):
        scores = table.get((prompt_key(messages), answer.text.strip()))
        return sum(scores) / len(scores) if scores else 0.0
    return reward


def build_raft(samples: dict[str, tuple[list[dict], list[Sample]]], reward, min_reward: float | None = None,
               eval_fraction: float = 0.1, tools: dict[str, dict] | None = None):
    """(train, eval, card): for each prompt key -> (messages, k sampled answers), the best-scoring answer
    (first on ties) if it scores >= min_reward (default: above 0); `tools`: the tools each prompt offered."""
    kept, rewards = [], []
    dropped = {"below_min_reward": 0, "empty": 0}
    tools = tools or {}
    for key, (messages, answers) in samples.items():
        scored = [(reward(messages, a), i, a) for i, a in enumerate(answers) if not a.empty]
        if not scored:
            dropped["empty"] += 1
            continue
        best, _, answer = max(scored, key=lambda t: (t[0], -t[1]))
        if (best < min_reward) if min_reward is not None else best <= 0:
            dropped["below_min_reward"] += 1
            continue
        rewards.append(best)
        example = {"messages": messages + [answer.message()], "reward": best, "episode": key,
                   **({"tools": tools[key]["tools"]} if key in tools else {})}
        kept.append(example)
    train, evals = split(kept, eval_fraction)
    k = max((len(a) for _, a in samples.values()), default=0)
    card = {"kind": "raft", "prompts": len(samples), "samples_per_prompt": k, "train": len(train), "eval": len(evals),
            "dropped": dropped, "filters": {"min_reward": min_reward if min_reward is not None else "> 0"},
            "mean_kept_reward": sum(rewards) / len(rewards) if rewards else None,
            "split": {"by": "prompt (lowest sha256)", "eval_fraction": eval_fraction},
            "tool_use": sum(1 for ex in kept if ex.get("tools")),
            "loss": "assistant turns only (the trainer masks the rest); tool calls written as serving writes them"}
    return train, evals, card


# -- retrieval-augmented fine-tuning (RAFT for domain RAG) ----------------------------------------------
@dataclass
class RagItem:
    question: str
    oracle_id: str
    oracle: str
    answer: str


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def quote_for(oracle: str, question: str, answer: str) -> str:
    """The oracle's sentence that best supports the answer: one containing it, else the most word overlap."""
    words = set(re.findall(r"\w+", (question + " " + answer).lower()))
    sents = _sentences(oracle) or [oracle.strip()]
    return max(sents, key=lambda s: (answer.lower() in s.lower(), len(words & set(re.findall(r"\w+", s.lower())))))


def rag_prompt(question: str, documents: list[str]) -> str:
    docs = "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(documents))
    return f"Documents:\n{docs}\n\nQuestion: {question}"


def rag_target(question: str, quote: str, answer: str) -> str:
    return (f"##begin_quote##{quote}##end_quote## The quoted passage answers the question.\n"
            f"<ANSWER>: {answer}")


def build_rag(items: list[RagItem], pool: list[tuple[str, str]], distractors: int = 3, oracle_fraction: float = 0.8,
              seed: int = 0, eval_fraction: float = 0.1):
    """(train, eval, card). Each item gets `distractors` documents sampled from `pool` ((id, text), the
    oracle excluded) in random order with the oracle, or, for a (1 - oracle_fraction) share, one more
    distractor instead of the oracle. Examples carry "answer" for the evaluation's accuracy."""
    rng = random.Random(seed)
    kept = []
    with_oracle = 0
    seen = set()
    for it in items:
        key = hashlib.sha256(it.question.encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        others = [t for i, t in pool if i != it.oracle_id and t.strip() != it.oracle.strip()]
        keep = rng.random() < oracle_fraction
        n = distractors if keep else distractors + 1
        docs = rng.sample(others, min(n, len(others)))
        if keep:
            docs.insert(rng.randrange(len(docs) + 1), it.oracle)
            with_oracle += 1
        target = rag_target(it.question, quote_for(it.oracle, it.question, it.answer), it.answer)
        example = {"messages": [{"role": "user", "content": rag_prompt(it.question, docs)},
                                {"role": "assistant", "content": target}],
                   "answer": it.answer, "oracle": keep, "episode": key}
        kept.append(example)
    train, evals = split(kept, eval_fraction)
    n = len(kept)
    card = {"kind": "rag", "questions": len(items), "unique_questions": n, "train": len(train), "eval": len(evals),
            "distractors": distractors, "oracle_fraction": oracle_fraction,
            "with_oracle": with_oracle, "distractors_only": n - with_oracle, "pool": len(pool), "seed": seed,
            "target": "##begin_quote##...##end_quote## then <ANSWER>: (accuracy: the answer appears in the reply)",
            "split": {"by": "question (lowest sha256)", "eval_fraction": eval_fraction}}
    return train, evals, card
