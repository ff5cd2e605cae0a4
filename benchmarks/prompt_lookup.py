"""Prompt-lookup decoding on copy-heavy agent work (issue 33): extract fields from a tool result, quote a
document, rewrite a JSON record, restate an earlier answer. Each task's reply runs on the own engine in-process
(greedy, the resident cache off so that no run reuses another's prompt), with drafts (`prompt_lookup_tokens`,
default 8) and without (0), at batch 1 (one reply at a time) and batch 8 (eight at once, two of each task); and,
as a control, plain chat questions (little to copy) at batch 1.

Prints a table and one JSON line: tokens/s each way, `ratio_lookup_b1`, `ratio_lookup_b8`, `ratio_lookup_chat_b1`
(with over without; > 1: drafts faster), the share of drafted tokens accepted, and whether every reply's tokens
are identical.

    python benchmarks/prompt_lookup.py [--tokens 160] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quick  # noqa: E402
from concurrency import QUESTIONS  # noqa: E402

CUSTOMERS = [("Alice Moreau", "alice.moreau@example.com", "Lyon"), ("Bram de Vries", "bram@vries.nl", "Utrecht"),
             ("Chen Wei", "chen.wei@example.cn", "Suzhou"), ("Dana Okafor", "dana.okafor@example.ng", "Lagos"),
             ("Eva Lindqvist", "eva.l@example.se", "Uppsala"), ("Farid Haddad", "farid@haddad.lb", "Beirut")]
DOCUMENT = ("The kernel owns the models. Agents do not load weights themselves; they ask the kernel, which "
            "schedules their calls on one batch.\n\nWhen an agent waits for a tool, the kernel keeps its cache for "
            "a while, so that the next call does not compute the same prompt again. The time it keeps it is "
            "predicted from how long that tool took before.\n\nEvery file an agent writes is versioned, and every "
            "version can be read back, shared or rolled back.")
RECORD = {"order_id": "A-1042", "customer": "Dana Okafor", "status": "pending", "items": [
    {"sku": "KB-201", "name": "keyboard", "qty": 1, "price": 49.0},
    {"sku": "MS-330", "name": "mouse", "qty": 2, "price": 19.5}], "address": {
    "street": "12 Marina Road", "city": "Lagos", "country": "NG"}, "notes": "leave at the front desk"}
ANSWER = ("To rotate the admin token, create a new token with kernos token create, give it to the operators, "
          "then revoke the old one with kernos token revoke. Agents are not affected, because their tokens are "
          "separate from operator tokens. Do it while traffic is low, and check kernos status afterwards.")


def tasks() -> dict[str, list[dict]]:
    rows = "\n".join(json.dumps({"name": n, "email": e, "city": c, "orders": i + 2})
                     for i, (n, e, c) in enumerate(CUSTOMERS))
    return {
        "extract": [{"role": "user", "content": "Here are our customers from the CRM tool:\n" + rows +
                     "\n\nList every customer's name, email and city as CSV lines (name,email,city)."}],
        "quote": [{"role": "user", "content": DOCUMENT + "\n\nQuote the second paragraph above word for word."}],
        "rewrite": [{"role": "user", "content": "Here is an order record:\n" + json.dumps(RECORD, indent=1) +
                     "\n\nReturn the same record as JSON with the status set to \"shipped\"."}],
        "restate": [{"role": "user", "content": "How do I rotate the kernel's admin token?"},
                    {"role": "assistant", "content": ANSWER},
                    {"role": "user", "content": "Repeat your previous answer exactly, word for word."}]}


def run(served, prompts: list[tuple[str, list[int]]], width: int, max_tokens: int) -> tuple[float, dict, int]:
    """Each prompt's reply, `width` at a time: (seconds, token ids by name, tokens)."""
    from kernos.kernel.llm.types import GenRequest, RequestHandle

    def one(item):
        name, ids = item
        req = GenRequest(request_id=f"pl-{name}-{time.monotonic_ns()}", agent_id=f"agent-{name}", prompt_ids=ids,
                         max_tokens=max_tokens)
        handle = RequestHandle(req)
        served.engine.submit(req, handle)
        return name, handle.result(timeout=900).token_ids

    t0 = time.perf_counter()
    with ThreadPoolExecutor(width) as pool:
        out = dict(pool.map(one, prompts))
    return time.perf_counter() - t0, out, sum(len(v) for v in out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a local transformers folder (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=160, help="reply budget")
    ap.add_argument("--draft", type=int, default=8, help="prompt_lookup_tokens when on")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting (alternating; the best counts)")
    ap.add_argument("--quick", action="store_true", help=quick.HELP)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kernos-bench-lookup-"))
    if args.quick:
        args.model, args.tokens, args.repeats = str(quick.tiny_model(work)), 16, 1

    from kernos.kernel.config import EngineConfig, KernelConfig, ModelConfig
    from kernos.kernel.llm.core import LLMCore

    model = ModelConfig(name="bench", path=str(Path(args.model).resolve()) if args.model else "embedded")
    core = LLMCore([model], "bench", EngineConfig(resident_cache_bytes=0, prompt_lookup_tokens=args.draft),
                   KernelConfig().scheduler.make, work)
    served = core.get("bench")
    engine = served.engine
    encoded = {name: served.encode_chat(msgs) for name, msgs in tasks().items()}
    batch1 = list(encoded.items())
    batch8 = [(f"{name}{k}", ids) for k in range(2) for name, ids in encoded.items()]
    chat = [(f"chat{i}", served.encode_chat([{"role": "user", "content": q}])) for i, q in enumerate(QUESTIONS[:4])]
    result: dict = {"model": engine.lm.name, "dtype": str(engine.lm.dtype).replace("torch.", ""),
                    "draft": args.draft, "max_tokens": args.tokens}
    try:
        run(served, batch1[:1], 1, 8)                               # warm-up
        identical = True
        for label, prompts, width in (("b1", batch1, 1), ("b8", batch8, 8), ("chat_b1", chat, 1)):
            best = {"on": None, "off": None}
            outputs = {}
            for _ in range(args.repeats):
                for mode in ("off", "on"):
                    engine.lookup_tokens = args.draft if mode == "on" else 0
                    d0, a0 = engine.stats.draft_tokens, engine.stats.draft_accepted
                    secs, out, toks = run(served, prompts, width, args.tokens)
                    rate = toks / secs
                    if best[mode] is None or rate > best[mode]["tok_s"]:
                        best[mode] = {"tok_s": round(rate, 1), "tokens": toks, "seconds": round(secs, 2),
                                      "drafted": engine.stats.draft_tokens - d0,
                                      "accepted": engine.stats.draft_accepted - a0}
                    identical &= outputs.setdefault(mode, out) == out
            identical &= outputs["on"] == outputs["off"]
            ratio = best["on"]["tok_s"] / best["off"]["tok_s"]
            drafted = best["on"]["drafted"]
            result[label] = best
            result[f"ratio_lookup_{label}"] = round(ratio, 3)
            result[f"accepted_share_{label}"] = round(best["on"]["accepted"] / drafted, 3) if drafted else 0.0
            print(f"{label:8s}: without drafts {best['off']['tok_s']:7.1f} tok/s, with {best['on']['tok_s']:7.1f}"
                  f" tok/s ({ratio:.2f}x); drafted {drafted}, accepted {best['on']['accepted']}")
        result["identical"] = identical
        print(f"replies identical with and without drafts: {identical}")
    finally:
        core.drain(30)
    print(json.dumps(result))
    if not result["identical"]:
        sys.exit("replies differ with and without drafts")


if __name__ == "__main__":
    main()
