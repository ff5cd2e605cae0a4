"""Agents' real workload: N agents hold T-turn conversations that share a ~400-token system prompt, 32
tokens a reply, greedy. Three ways, one after the other in one run:

- Kernos through kernel contexts (the SDK; the client sends only the new message, the kernel keeps the
  conversation), with resident contexts on (the engine keeps each conversation's KV between turns);
- the same with resident contexts off (`engine.resident_cache_bytes = 0`: every turn prefilled whole);
- vLLM's CPU build through its OpenAI server with prefix caching on (the client resends the whole
  conversation each turn; see vllm_server.py).

Reports total wall and time to first token per turn (p50, p99; turn 1 apart). Prints a table and one JSON
line; `ratio_*` are vLLM's time over Kernos's (>= 1: Kernos as fast or faster) and reuse-off over reuse-on.

    python benchmarks/multiturn.py [--agents 8] [--turns 6] [--skip-vllm]
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent / "tests"), str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import quick  # noqa: E402
from vllm_server import VllmServer  # noqa: E402

MODEL = "smollm2-135m-instruct"
RULES = [
    "Answer in one or two short sentences unless the user asks for detail.",
    "Use the tools you are given only when a question needs fresh facts or arithmetic.",
    "Never reveal the contents of another agent's files, memory or conversations.",
    "When you are unsure, say what you would need to know, instead of guessing.",
    "Keep units and numbers exactly as the user wrote them, and show your arithmetic when you compute.",
    "Prefer plain words to jargon, and define any technical term the first time you use it.",
    "If a request is ambiguous, choose the most likely reading and say which one you chose.",
    "Summaries must keep names, dates, amounts and decisions; drop greetings and filler.",
    "Write code only when asked, in Python, with a short comment on what it does.",
    "Quote file paths and identifiers exactly; never invent a path that was not given to you.",
    "Stop as soon as the question is answered; do not offer further help unless asked.",
    "Times are in UTC unless the user gives a time zone; dates are written year-month-day.",
]
SYSTEM = ("You are an agent running on the Kernos kernel, a small operating system for language-model agents. "
          "The kernel schedules your requests next to other agents, keeps your files and memory private, and "
          "checks every tool call against your grants. Follow these rules in every reply.\n"
          + "\n".join(f"{i + 1}. {r}" for i, r in enumerate(RULES * 2)))
QUESTIONS = ["What is the capital of {c}?", "Name one famous dish from {c}.", "How warm is {c} in summer?",
             "What language is spoken in {c}?", "Name a river in {c}.", "What is a good month to visit {c}?",
             "Name a mountain in {c}.", "Which currency does {c} use?", "Name a festival in {c}.",
             "What sea or ocean is near {c}?"]
COUNTRIES = ["France", "Japan", "Peru", "Kenya", "Norway", "Egypt", "Korea", "Chile", "Spain", "Ghana", "Nepal",
             "Italy", "Mexico", "Canada", "India", "Brazil"]


def question(agent: int, turn: int) -> str:
    return QUESTIONS[(agent + turn) % len(QUESTIONS)].format(c=COUNTRIES[agent % len(COUNTRIES)])


def run_agents(n: int, agent_fn) -> tuple[float, dict[int, list[float]]]:
    """Wall time, and TTFT (ms) per turn index over all agents."""
    ttfts: dict[int, list[float]] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def wrapped(i: int) -> None:
        try:
            for turn, ms in enumerate(agent_fn(i)):
                with lock:
                    ttfts.setdefault(turn, []).append(ms)
        except Exception as e:  # noqa: BLE001 - reported after the run
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} agents failed, e.g. {errors[0]}")
    return time.perf_counter() - t0, ttfts


def kernos(folder: Path, work: Path, agents: int, turns: int, max_tokens: int, resident: bool,
           engine: dict | None = None) -> tuple:
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel

    engine = dict(engine or {}, **({} if resident else {"resident_cache_bytes": 0}))
    tag = "on" if resident else "off"
    cfg = write_config(work / f"k-{tag}.toml", [{"name": MODEL, "path": str(folder)}],
                       **({"engine": engine} if engine else {}))
    proc, address = start_kernel(work / f"data-{tag}-{time.monotonic_ns()}", str(cfg), timeout=300)
    try:
        sessions = [kernos.sdk.connect(address, agent=f"mt-{i}") for i in range(agents)]
        sessions[0].llm.chat("warm up", max_tokens=4)
        window = {m.name: m.context_length for m in sessions[0].llm.models()}[MODEL]
        budget = min(2048, window - max_tokens)       # a context's prompts leave the reply its room

        def agent(i: int):
            s = sessions[i]
            s.memory.create_context(f"conv-{i}", budget_tokens=budget, system=SYSTEM)
            for turn in range(turns):
                t0 = time.perf_counter()
                first = None
                for chunk in s.llm.stream([{"role": "user", "content": question(i, turn)}], context_id=f"conv-{i}",
                                          max_tokens=max_tokens, temperature=0):
                    if first is None and (chunk.text or chunk.done):
                        first = (time.perf_counter() - t0) * 1e3
                yield first

        wall, ttfts = run_agents(agents, agent)
        st = sessions[0].kernel.stats().models[0] if hasattr(sessions[0], "kernel") else None
        return wall, ttfts, st
    finally:
        stop_kernel(proc)


def vllm(folder: Path, agents: int, turns: int, max_tokens: int) -> tuple:
    import openai

    with VllmServer(folder, MODEL, prefix_caching=True) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=4)

        def agent(i: int):
            messages = [{"role": "system", "content": SYSTEM}]
            for turn in range(turns):
                messages.append({"role": "user", "content": question(i, turn)})
                t0 = time.perf_counter()
                first, text = None, ""
                for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                            temperature=0, stream=True):
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if first is None and piece:          # the first text, not the empty role chunk
                        first = (time.perf_counter() - t0) * 1e3
                    text += piece or ""
                messages.append({"role": "assistant", "content": text})
                yield first

        wall, ttfts = run_agents(agents, agent)
        return wall, ttfts, None


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(wall: float, ttfts: dict[int, list[float]]) -> dict:
    later = [x for t, xs in ttfts.items() if t > 0 for x in xs]
    return {"wall_s": round(wall, 2), "ttft_turn1_p50_ms": round(pct(ttfts.get(0, []), 0.5), 1),
            "ttft_later_p50_ms": round(pct(later, 0.5), 1), "ttft_later_p99_ms": round(pct(later, 0.99), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="", help="a local transformers folder (default: the embedded model)")
    ap.add_argument("--skip-vllm", action="store_true", help="Kernos with reuse on and off only")
    ap.add_argument("--kernos-engine", nargs="*", default=[], metavar="KEY=VALUE",
                    help="[engine] settings for Kernos, e.g. prefill_chunk_tokens=32")
    ap.add_argument("--quick", action="store_true", help=quick.HELP + " (Kernos only: vLLM's server takes minutes "
                                                                      "to start)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="kernos-bench-multiturn-"))
    if args.quick:
        args.agents, args.turns, args.max_tokens, args.skip_vllm = 2, 2, 4, True
        args.model = str(quick.tiny_model(work))
    if args.model:
        folder = Path(args.model).resolve()
    else:
        from kernos.kernel.llm.embedded import ensure_converted

        folder = ensure_converted(work / "data-on")
    engine = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
              for k, v in (kv.split("=", 1) for kv in args.kernos_engine)}
    runs = {}
    for name, fn in (("kernos", lambda: kernos(folder, work, args.agents, args.turns, args.max_tokens, True, engine)),
                     ("kernos_no_reuse", lambda: kernos(folder, work, args.agents, args.turns, args.max_tokens,
                                                        False, engine)),
                     ("vllm", lambda: vllm(folder, args.agents, args.turns, args.max_tokens))):
        if name == "vllm" and args.skip_vllm:
            continue
        wall, ttfts, _ = fn()
        runs[name] = summary(wall, ttfts)
        print(f"{name}: {runs[name]}", file=sys.stderr, flush=True)

    cols = list(runs)
    print(f"{'':<32}" + "".join(f"{c:>18}" for c in cols))
    for key, label in (("wall_s", "wall for all calls (s)"), ("ttft_turn1_p50_ms", "TTFT turn 1 p50 (ms)"),
                       ("ttft_later_p50_ms", f"TTFT turns 2-{args.turns} p50 (ms)"),
                       ("ttft_later_p99_ms", f"TTFT turns 2-{args.turns} p99 (ms)")):
        print(f"{label:<32}" + "".join(f"{runs[c][key]:>18.1f}" for c in cols))
    out = {"agents": args.agents, "turns": args.turns, "max_tokens": args.max_tokens, **runs}
    k, off = runs["kernos"], runs["kernos_no_reuse"]
    out["ratio_reuse_ttft_later_p50"] = round(off["ttft_later_p50_ms"] / k["ttft_later_p50_ms"], 2)
    if "vllm" in runs:
        v = runs["vllm"]
        out["ratio_vllm_kernos_wall"] = round(v["wall_s"] / k["wall_s"], 2)
        out["ratio_vllm_kernos_ttft_later_p50"] = round(v["ttft_later_p50_ms"] / k["ttft_later_p50_ms"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
