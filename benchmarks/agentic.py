"""Tool-using agents, the work Kernos exists for (issue 33): N agent programs arrive as a Poisson process; each
sends a shared ~350-token system prompt with 3 tools, makes R rounds of a forced tool call (the client runs the
tool: it sleeps a drawn 0.3-2.5 s and returns ~150 tokens of results), then asks for a short answer. All through
the same `openai` client, streaming, greedy, seeded: the same programs for every server.

Servers, one after the other in one run: Kernos on its default config (client-side loop over `/v1`), Kernos
with each mechanism given as `--variant NAME:KEY=VALUE,...` (engine or scheduler settings, e.g. to turn one
off), and vLLM's CPU build with prefix caching (see vllm_server.py).

Reports per server: job completion time (mean, p95), programs per minute, a model call's latency (mean), time to
the first token of a call that follows a tool result (mean, p95), and the engine's own counters where it has
them. Prints a table and one JSON line; `ratio_vllm_kernos_*` is vLLM's time over Kernos's (>= 1: Kernos faster).

    python benchmarks/agentic.py [--programs 24] [--rate 1.5] [--rounds 3] [--skip-vllm]
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent / "tests"), str(_HERE)]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import quick  # noqa: E402
from multiturn import SYSTEM as CHAT_SYSTEM  # noqa: E402
from vllm_server import VllmServer  # noqa: E402

MODEL = "smollm2-135m-instruct"
SYSTEM = CHAT_SYSTEM.split("\n")[0] + "\n" + "\n".join(CHAT_SYSTEM.split("\n")[1:20])
TOOLS = [
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search the team's documentation and return the best passages.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "lookup_order", "description": "An order's status, items and delivery date by its id.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
]
TASKS = ["Find out how to rotate the kernel's admin token and whether it is safe during traffic.",
         "Check the weather in Lisbon, Oslo and Kyoto for a trip next week.",
         "Tell me where order A-{n} is and what it contains.",
         "Look up how the scheduler shares the GPU between agents.",
         "Compare the weather in Lima and Quito.",
         "Find the status of orders B-{n} and C-{n}."]
WORDS = ("kernel agent token cache scheduler memory file version grant quota model adapter batch prompt reply "
         "tool context snapshot swap resident budget prefix stream policy fair share priority weather rain sun "
         "wind order parcel depot courier delivered shipped pending item price").split()


def tool_result(rng: random.Random, name: str) -> str:
    """~150 tokens of plausible results."""
    lines = []
    for i in range(6):
        lines.append(f"{i + 1}. " + " ".join(rng.choice(WORDS) for _ in range(14)) + f" (id {rng.randint(100, 999)})")
    return f"{name} returned:\n" + "\n".join(lines)


def plan(programs: int, rate: float, rounds: int, seed: int, system: str = SYSTEM) -> list[dict]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(programs):
        t += rng.expovariate(rate)
        out.append({"start": t, "system": system, "program": f"program-{seed}-{i}",
                    "task": rng.choice(TASKS).format(n=rng.randint(1000, 9999)),
                    "tools": [(rng.uniform(0.3, 2.5), rng.randint(0, 10 ** 6)) for _ in range(rounds)]})
    return out


def run_program(client, prog: dict, max_tokens: int, answer_tokens: int, rec: dict) -> None:
    messages = [{"role": "system", "content": prog["system"]}, {"role": "user", "content": prog["task"]}]
    for r, (seconds, tool_seed) in enumerate(prog["tools"] + [(0.0, 0)]):
        final = r == len(prog["tools"])
        t0 = time.perf_counter()
        kw = dict(model=MODEL, messages=messages, tools=TOOLS, max_tokens=answer_tokens if final else max_tokens,
                  temperature=0, stream=True, stream_options={"include_usage": True},
                  extra_headers={"X-Kernos-Program": prog["program"]})   # the agent program (vLLM ignores it)
        kw.update(tool_choice="none") if final else kw.update(tool_choice="required", parallel_tool_calls=False)
        first, text, calls, usage = None, "", {}, None
        for chunk in client.chat.completions.create(**kw):
            if chunk.usage:
                usage = chunk.usage
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            if first is None and (d.content or d.tool_calls):
                first = time.perf_counter() - t0
            text += d.content or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                c["id"] = tc.id or c["id"]
                if tc.function:
                    c["name"] += tc.function.name or ""
                    c["arguments"] += tc.function.arguments or ""
        took = time.perf_counter() - t0
        rec["calls"].append(took)
        rec["completion_tokens"] += usage.completion_tokens if usage else 0
        if r > 0:
            rec["ttft_after_tool"].append(first if first is not None else took)
        if final:
            return
        if not calls:
            raise RuntimeError(f"round {r}: a forced tool call came back without a call: {text[:80]!r}")
        call = calls[min(calls)]
        call_id = call["id"] or f"call_{r}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        time.sleep(seconds)                                   # the tool runs on the client's side
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": tool_result(random.Random(tool_seed), call["name"])})


def drive(client, programs: list[dict], max_tokens: int, answer_tokens: int) -> dict:
    recs = [{"calls": [], "ttft_after_tool": [], "completion_tokens": 0, "jct": None, "error": None}
            for _ in programs]
    t0 = time.perf_counter()

    def one(i: int) -> None:
        delay = programs[i]["start"] - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        try:
            run_program(client, programs[i], max_tokens, answer_tokens, recs[i])
            recs[i]["jct"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - counted and reported
            recs[i]["error"] = f"{type(e).__name__}: {e}"[:200]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(programs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    jcts = [r["jct"] for r in recs if r["jct"] is not None]
    calls = [c for r in recs for c in r["calls"]]
    after = [c for r in recs for c in r["ttft_after_tool"]]
    errors = [r["error"] for r in recs if r["error"]]
    return {"jct_mean_s": mean(jcts), "jct_p95_s": pct(jcts, 0.95), "programs_per_min": round(len(jcts) / wall * 60, 2),
            "call_mean_s": mean(calls), "ttft_after_tool_mean_s": mean(after),
            "ttft_after_tool_p95_s": pct(after, 0.95), "completion_tokens": sum(r["completion_tokens"] for r in recs),
            "wall_s": round(wall, 2), "errors": len(errors), "first_error": errors[0] if errors else ""}


def mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 3) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else float("nan")


def kernos(folder: Path, work: Path, tag: str, settings: dict, programs, args) -> dict:
    import openai
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel, stop_kernel

    cfg = write_config(work / f"k-{tag}.toml", [{"name": MODEL, "path": str(folder)}], **settings)
    proc, address = start_kernel(work / f"data-{tag}", str(cfg), timeout=300)
    try:
        session = kernos.sdk.connect(address, agent=f"agentic-{tag}")
        client = openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=session.token, max_retries=0,
                               timeout=900)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=4)
        before = engine_counters(session)
        out = drive(client, programs, args.max_tokens, args.answer_tokens)
        after = engine_counters(session)
        out.update({k: after[k] - before[k] for k in ("prompt_tokens", "prefix_tokens_reused", "decode_steps",
                                                      "generated_tokens")})
        out.update({f"pauses_{k}": n - before["tool_pauses"].get(k, 0) for k, n in after["tool_pauses"].items()})
        out["prefix_reuse"] = round(out["prefix_tokens_reused"] / max(1, out["prompt_tokens"]), 3)
        out["mean_batch"] = round(out["generated_tokens"] / max(1, out["decode_steps"]), 2)
        return out
    finally:
        stop_kernel(proc)


def engine_counters(session) -> dict:
    m = session.kernel.stats().models[0]
    out = {k: getattr(m, k) for k in ("prompt_tokens", "prefix_tokens_reused", "decode_steps", "generated_tokens")}
    out["tool_pauses"] = dict(m.tool_pauses)
    return out


def vllm(folder: Path, programs, args) -> dict:
    import openai

    from kernos.kernel.llm.cpu_speed import fast_cpu_dtype

    # the dtype Kernos computes in on this CPU (bf16 where it is native, else float32: emulated bf16 is slower);
    # the embedded model writes Hermes-style <tool_call> blocks: vLLM's hermes parser reads them. SmolLM2's own
    # chat template drops tools, calls and results (vLLM's prompts were 30% shorter, the model blind to its
    # tools): vLLM gets the template that writes them as Kernos does, the same prompt text token for token
    dtype = str(fast_cpu_dtype()).removeprefix("torch.")
    template = _HERE / "hermes_tools.jinja"
    with VllmServer(folder, MODEL, dtype=dtype, prefix_caching=True, max_model_len=4096,
                    extra=["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                           "--chat-template", str(template)]) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "warm up"}], max_tokens=4)
        before = vllm_counters(url)
        out = drive(client, programs, args.max_tokens, args.answer_tokens)
        after = vllm_counters(url)
        out.update({k: after[k] - before[k] for k in after})
        if out.get("prompt_tokens"):
            out["prefix_reuse"] = round(out["prefix_tokens_reused"] / out["prompt_tokens"], 3)
        return out


def vllm_counters(url: str) -> dict:
    """vLLM's own counters from its /metrics: prompt tokens and those its prefix cache served."""
    import urllib.request

    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    names = {"vllm:prompt_tokens_total": "prompt_tokens", "vllm:prefix_cache_hits_total": "prefix_tokens_reused"}
    out = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in names:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME:section.key=value,...  e.g. noreuse:engine.resident_cache_bytes=0"""
    name, _, rest = text.partition(":")
    settings: dict = {}
    for kv in filter(None, rest.split(",")):
        key, _, value = kv.partition("=")
        section, _, field = key.partition(".")
        settings.setdefault(section, {})[field] = json.loads(value) if value[:1].isdigit() or value in (
            "true", "false") else value
    return name, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=24)
    ap.add_argument("--rate", type=float, default=1.5, help="programs arriving per second (Poisson)")
    ap.add_argument("--rounds", type=int, default=3, help="forced tool calls per program")
    ap.add_argument("--max-tokens", type=int, default=64, help="budget of a tool-call reply")
    ap.add_argument("--answer-tokens", type=int, default=32, help="budget of the final answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="", help="a local transformers folder (default: the embedded model)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:SECTION.KEY=VALUE,...",
                    help="also run Kernos with these settings, e.g. fifo:scheduler.policy=fifo")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-kernos", action="store_true", help="vLLM only")
    ap.add_argument("--quick", action="store_true", help=quick.HELP + " (Kernos only)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="kernos-bench-agentic-"))
    if args.quick:
        args.programs, args.rate, args.rounds, args.max_tokens, args.answer_tokens = 2, 4.0, 1, 120, 4
        args.skip_vllm = True
        args.model = str(quick.tiny_model(work))
    if args.model:
        folder = Path(args.model).resolve()
    else:
        from kernos.kernel.llm.embedded import ensure_converted

        folder = ensure_converted(work / "model")
    # (the tiny model's tokenizer spends a token on a character or two: a short system prompt keeps it in its window)
    programs = plan(args.programs, args.rate, args.rounds, args.seed, SYSTEM[:200] if args.quick else SYSTEM)
    runs: dict[str, dict] = {}
    for name, settings in [] if args.skip_kernos else [("kernos", {})] + [parse_variant(v) for v in args.variant]:
        runs[name] = kernos(folder, work, name, settings, programs, args)
        print(f"{name}: {runs[name]}", file=sys.stderr, flush=True)
    if not args.skip_vllm:
        runs["vllm"] = vllm(folder, programs, args)
        print(f"vllm: {runs['vllm']}", file=sys.stderr, flush=True)

    cols = list(runs)
    print(f"{'':<30}" + "".join(f"{c:>16}" for c in cols))
    for key, label in (("jct_mean_s", "job completion mean (s)"), ("jct_p95_s", "job completion p95 (s)"),
                       ("programs_per_min", "programs per minute"), ("call_mean_s", "model call mean (s)"),
                       ("ttft_after_tool_mean_s", "TTFT after a tool mean (s)"),
                       ("ttft_after_tool_p95_s", "TTFT after a tool p95 (s)"), ("errors", "errors")):
        print(f"{label:<30}" + "".join(f"{runs[c][key]:>16.2f}" for c in cols))
    out = {"programs": args.programs, "rate": args.rate, "rounds": args.rounds, **runs}
    if "vllm" in runs and "kernos" in runs:
        for key in ("jct_mean_s", "jct_p95_s", "ttft_after_tool_mean_s"):
            out[f"ratio_vllm_kernos_{key}"] = round(runs["vllm"][key] / runs["kernos"][key], 2)
    print(json.dumps(out))
    if args.quick and any(r["errors"] for r in runs.values()):
        sys.exit(f"errors in the quick run: {[r['first_error'] for r in runs.values() if r['errors']]}")


if __name__ == "__main__":
    main()
