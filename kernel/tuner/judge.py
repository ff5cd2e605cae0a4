"""A judge for agents without a verifier (OpenPipe's RULER): a model the kernel serves reads the task and a
group of replies to it, side by side, and scores each reply from 0 to 1 against the others. Relative scoring
is what GRPO needs (only the differences inside a group matter), and it is easier for a model than an absolute
grade. The judge's reply is constrained to `{"scores": [n numbers in 0..1]}` by the grammar of the kernel's
structured output, so a well-formed verdict is guaranteed and a cut or out-of-range one is an error, counted
and never fatal (the group is left unscored).

Pure functions: the prompt, the output schema and the reading of the verdict; the syscall runs the call."""
from __future__ import annotations

import json
import math

RUBRIC = ("A reply is better when it does what the task asks, correctly and completely, in the form the task asks "
          "for. A reply that is wrong, off-topic, invented or cut off scores low, however fluent.")
MAX_REPLY_CHARS = 1500
MAX_TASK_CHARS = 4000


class JudgeError(ValueError):
    pass


def render_task(messages: list[dict]) -> str:
    lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
    text = "\n".join(lines)
    return text if len(text) <= MAX_TASK_CHARS else "...\n" + text[-MAX_TASK_CHARS:]


def prompt(messages: list[dict], replies: list[str], rubric: str = "") -> list[dict]:
    """The judge's chat: the task (the conversation the replies answer), the numbered replies and the rubric."""
    shown = "\n\n".join(f"[{i + 1}]\n{r[:MAX_REPLY_CHARS]}" for i, r in enumerate(replies))
    return [
        {"role": "system", "content": "You are a careful judge. You compare several replies to the same task and "
                                      "score each between 0 and 1 relative to the others: the best reply gets the "
                                      "highest score, equally good replies equal scores."},
        {"role": "user", "content": f"Task:\n{render_task(messages)}\n\nReplies:\n{shown}\n\n"
                                    f"Rubric: {rubric or RUBRIC}\n\n"
                                    f'Answer with JSON: {{"scores": [...]}}, {len(replies)} numbers between 0 and 1, '
                                    "one per reply, in order."},
    ]


def schema(n: int) -> dict:
    """The verdict's JSON schema for a group of `n` replies."""
    return {"type": "object", "properties": {"scores": {"type": "array", "minItems": n, "maxItems": n,
                                                        "items": {"type": "number", "minimum": 0, "maximum": 1}}},
            "required": ["scores"], "additionalProperties": False}


def max_tokens(n: int) -> int:
    """Room for a verdict on `n` replies (a number takes a few tokens)."""
    return 16 + 8 * n


def verdict(text: str, n: int) -> list[float]:
    """The scores of a judge's reply, checked: JudgeError naming what is wrong."""
    try:
        scores = json.loads(text)["scores"]
    except (ValueError, KeyError, TypeError):
        raise JudgeError(f"the judge's verdict is not {{\"scores\": [...]}}: {text[:120]!r}") from None
    if not isinstance(scores, list) or len(scores) != n:
        raise JudgeError(f"the judge gave {len(scores) if isinstance(scores, list) else 'no'} scores for {n} replies")
    out = []
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= 1:
            raise JudgeError(f"the judge's score {s!r} is not a number between 0 and 1")
        out.append(float(s))
    return out
