"""The vLLM backend: a model served by vLLM's in-process async engine (AsyncLLM) behind Kernos's Engine interface,
so agents, access, quotas, traces, contexts, tools, structured output, adapters and stats work as on the own engine.

vLLM runs its engine core in a child process (and its workers on GPUs or on other nodes through Ray); this
module's thread runs an asyncio loop that talks to it. What maps to what:
- a request: its token ids (the kernel formats prompts, one way for every engine), its sampling (`requests.py`:
  every sampling field, and prompt scoring), its LoRA
  adapter (`LoRARequest`, per request), and its place in vLLM's queue: `[scheduler] policy` fifo is vLLM's
  "fcfs"; priority and fair_share are vLLM's "priority", each request placed when it is admitted by the policy
  (`Policy.admission_priority`: Kernos priority, higher first; or the agent's fair-share usage, lower first);
  round_robin is refused at start (vLLM gives no time slices);
- text: vLLM returns token ids; Kernos's own detokenizer turns them into text and applies stop strings, so the
  text, stop handling and streaming are the own engine's, also across a suspend;
- tool calls and response formats: the request's grammar (the llguidance Lark grammar the own engine uses) goes
  to vLLM's structured outputs (backend "guidance"); replies are parsed by the syscall layer as for the own engine;
- cancel: vLLM's abort; suspend, snapshot, resume and restore: `switching.py`;
- adapters: loaded with `add_lora` at start and when the tuner publishes one; a new version gets a new LoRA id, so
  requests already running keep the version they started with;
- stats: a vLLM stat logger (running, waiting, KV usage, preemptions, steps) and each request's prefix-cache hit.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from kernos.abi.errors import StatusError
from kernos.scheduler import FifoPolicy, RequestView

from ..base import ALL_SHAPING, Engine, EngineStats
from ..engine.detokenizer import Detokenizer
from ..registry import ModelLoadError, architecture_of, eos_ids, model_folder
from ..settings import EngineConfig, ModelConfig
from ..tool_calls import repeat_watch
from ..types import EngineClosed, Failed, Final, Finish, GenRequest, RequestHandle, RequestTooLarge, TextDelta
from ..window import WindowError
from .requests import prompt_logprobs, sampling_params
from .setup import add_window_args, check_topology, engine_args, import_vllm
from .stats import bytes_per_token, parameters, stat_logger
from .switching import Run, Switching

log = logging.getLogger("kernos.llm")

START_TIMEOUT_S = 1800.0        # a big model's first start compiles and loads for minutes
WATCH_S = 0.05                  # how often cancelled handles are looked for


class VllmEngine(Switching, Engine):
    shaping = ALL_SHAPING      # every sampling field (kernos.kernel.llm.types.Shaping)
    scores = True

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, data_dir: Path, policy=None):
        self.name = cfg.name
        self.cfg = cfg
        self.policy = policy if policy is not None else FifoPolicy()
        self.path = model_folder(cfg, data_dir)
        import_vllm(cfg.name)
        self.args = engine_args(cfg, engine, self.path, self.policy)
        self.stats = EngineStats()
        self.adapters: list[str] = []
        self._loras: dict[str, object] = {}     # adapter name -> its current LoRARequest
        self._lora_ids = 0
        self._live: dict[str, Run] = {}
        self._lock = threading.Lock()           # guards _live for snapshot() from other threads
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.llm = None
        self.kv_bytes = 0

    # -- starting: vLLM's engine on this engine's own loop ----------------------------------------------------
    def open(self) -> None:
        """Start vLLM (blocking until it serves) and load the entry's adapters; ModelLoadError on failure."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        check_topology(self.name, self.args)
        try:
            self.hf_config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            add_window_args(self.cfg, self.hf_config, self.args)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except WindowError as e:
            raise ModelLoadError(str(e)) from None
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model '{self.name}': cannot load {self.path}: {e}") from e
        try:
            gen_eos = GenerationConfig.from_pretrained(self.path, local_files_only=True).eos_token_id
        except OSError:
            gen_eos = None
        self.eos_ids = eos_ids(self.tokenizer, gen_eos)
        self._thread = threading.Thread(target=self._thread_main, name=f"vllm-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise ModelLoadError(f"model '{self.name}': vLLM did not start within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            raise ModelLoadError(f"model '{self.name}': vLLM failed to start: {self._error}") from self._error
        for name, folder in self.cfg.adapters.items():
            folder_path = Path(folder).expanduser()
            if not (folder_path / "adapter_config.json").exists():
                raise ModelLoadError(f"model '{self.name}': adapter '{name}': {folder_path} has no adapter_config.json")
            try:
                self.load_adapter(name, folder_path).result(timeout=600)
            except Exception as e:
                raise ModelLoadError(f"model '{self.name}': adapter '{name}': {e}") from e
        mc = self.llm.model_config
        log.info("loaded model %s on vLLM (%s, %s, %s, context %d, KV cache %.0f MiB, adapters=%s)", self.name,
                 self.hf_config.model_type, self.device, self.dtype, mc.max_model_len, self.kv_bytes / 2**20,
                 self.adapters or "none")

    def _thread_main(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start_llm())
        except BaseException as e:          # reported by open()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        watcher = self._loop.create_task(self._watch())
        self._loop.run_forever()
        watcher.cancel()
        self._loop.run_until_complete(asyncio.gather(watcher, return_exceptions=True))
        self._loop.close()

    async def _start_llm(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args), stat_loggers=[stat_logger(self)])
        cache = self.llm.vllm_config.cache_config
        self.kv_bytes = int((cache.num_gpu_blocks or 0) * cache.block_size * bytes_per_token(self.llm))

    @property
    def device(self) -> str:
        from vllm.platforms import current_platform

        return current_platform.device_type

    @property
    def dtype(self) -> str:
        return str(self.llm.model_config.dtype).replace("torch.", "")

    @property
    def context_length(self) -> int:
        return int(self.llm.model_config.max_model_len)

    @property
    def architecture(self) -> str:
        return architecture_of(self.hf_config.model_type)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.get_text_config().vocab_size)

    @property
    def policy_name(self) -> str:
        mode = self.args["scheduling_policy"]
        return f"vllm:{mode}" + (f" ({self.policy.name} at admission)" if mode == "priority" else "")

    @property
    def cache_budget_bytes(self) -> int:
        return self.kv_bytes

    def parameters(self) -> int:
        return parameters(self.path)

    # -- the Engine interface (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        pass        # open() started it: a model serves once the kernel has loaded it

    def submit(self, request: GenRequest, handle: RequestHandle) -> None:
        if not self._accepting or self._loop is None:
            raise EngineClosed(f"model '{self.name}' is shutting down")
        if len(request.prompt_ids) + request.max_tokens > self.context_length:
            raise RequestTooLarge(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
                                  f"exceeds the context length of '{self.name}' on vLLM ({self.context_length})")
        run = Run(request, handle, Detokenizer(self.tokenizer, request.stop), enqueued=request.arrival,
                  repeats=repeat_watch(request))
        self._loop.call_soon_threadsafe(self._admit, run)

    def load_adapter(self, name: str, folder: Path) -> Future:
        """Load (or replace) a LoRA adapter: new requests use it; running ones keep the version they started with."""
        return self._call(self._load_adapter(name, Path(folder)))

    def drain(self, timeout: float) -> bool:
        self._accepting = False
        if self._loop is None or not self._loop.is_running():
            return True
        self._call(self._unpark_all()).result(timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._live:
            time.sleep(0.02)
        clean = not self._live
        try:
            self._call(self._close()).result(timeout=120)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        return clean

    def snapshot(self):
        with self._lock:
            runs = list(self._live.values())
        live = [(self._view(r), r.state) for r in runs]
        self.stats.running = sum(1 for r in runs if r.state == "running")
        self.stats.waiting = sum(1 for r in runs if r.state == "waiting")
        return self.stats, live

    def _call(self, coro) -> Future:
        if self._loop is None:
            coro.close()
            raise EngineClosed(f"model '{self.name}' is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _view(self, r: Run) -> RequestView:
        q = r.req
        return RequestView(q.request_id, q.agent_id, q.priority, q.arrival, len(q.prompt_ids), q.max_tokens,
                           len(r.ids), r.enqueued, 0, 0, r.preemptions, r.first_token_at, *q.program_fields())

    # -- on the engine's loop ----------------------------------------------------------------------------------
    def _admit(self, run: Run) -> None:
        if run.req.adapter and run.req.adapter not in self._loras:
            run.handle.put(Failed(f"model '{self.name}' has no adapter '{run.req.adapter}'"))
            return
        run.lora = self._loras.get(run.req.adapter) if run.req.adapter else None
        with self._lock:
            self._live[run.req.request_id] = run
        self._launch(run)

    def _launch(self, run: Run) -> None:
        run.attempt += 1
        run.state, run.stopping = "waiting", ""
        run.task = self._loop.create_task(self._serve(run))

    async def _serve(self, run: Run) -> None:
        from vllm.inputs.engine import tokens_input

        req = run.req
        left = req.max_tokens - len(run.ids)
        if left <= 0 and not (req.prompt_logprobs and not run.prompt_logprobs):    # max_tokens 0: scoring only
            self._finish(run, Finish.LENGTH)
            return
        place = self.policy.admission_priority(self._view(run), time.monotonic())
        gen = self.llm.generate(tokens_input(req.prompt_ids + run.ids), sampling_params(req, len(run.ids)),
                                f"{req.request_id}.{run.attempt}", lora_request=run.lora, priority=place)
        try:
            async for out in gen:
                finish = self._take(run, out)
                if finish is not None:
                    self._finish(run, finish)
                    return
        except asyncio.CancelledError:
            if run.stopping == "cancel":
                self._finish(run, Finish.CANCELLED)
            return                           # suspend / snapshot: the run keeps its tokens
        except Exception as e:
            log.exception("model %s: request %s failed on vLLM", self.name, req.request_id)
            self._fail(run, f"model '{self.name}' (vLLM): {type(e).__name__}: {e}")
        finally:
            await gen.aclose()               # a stop string ended it early: vLLM aborts the request

    def _take(self, run: Run, out) -> Finish | None:
        """A delta of new tokens: the run's ids, text and log-probabilities; its finish, if it ends here."""
        c = out.outputs[0]
        now = time.monotonic()
        if run.state == "waiting":
            run.state = "running"
            self._first_output(run, out, now)
        if run.req.prompt_logprobs and out.prompt_logprobs and not run.prompt_logprobs:
            run.prompt_logprobs = prompt_logprobs(run.req, out.prompt_logprobs)
            if not run.req.max_tokens:
                return Finish.LENGTH          # scored; the token vLLM had to generate is not the reply's
        self.stats.recent.append((now, len(c.token_ids)))
        self.stats.generated_tokens += len(c.token_ids)
        self.policy.record(run.req.agent_id, len(c.token_ids), now)     # fair share's usage, for admission
        if run.req.program is not None:
            run.req.program.computed(len(c.token_ids))
        finish = None
        ends = run.req.shaping.ends(self.eos_ids)
        for i, tok in enumerate(c.token_ids):
            if tok in ends:
                finish = Finish.STOP
                break
            run.ids.append(tok)
            if run.req.logprobs and c.logprobs:
                step = c.logprobs[i]
                top = sorted(step.items(), key=lambda kv: kv[1].rank)[: run.req.top_logprobs]
                run.logprobs.append((tok, float(step[tok].logprob), [(t, float(lp.logprob)) for t, lp in top]))
            if run.detok.add(run.ids) or (run.repeats is not None and run.repeats.repeated(run.detok.text)):
                finish = Finish.STOP
                break
            if len(run.ids) >= run.req.max_tokens:
                finish = Finish.LENGTH
                break
        if finish is None and out.finished:
            finish = {"length": Finish.LENGTH, "abort": Finish.CANCELLED}.get(c.finish_reason, Finish.STOP)
        if finish is None:
            new = run.detok.ready()
            if new:
                run.handle.put(TextDelta(new, len(run.ids), logprobs=run.logprobs[run.lp_sent:]))
                run.lp_sent = len(run.logprobs)
        return finish


    def _first_output(self, run: Run, out, now: float) -> None:
        if not run.first_token_at:
            run.first_token_at = now
        m = out.metrics
        if run.queue_wait_ms < 0:
            run.queue_wait_ms = max(0.0, (m.scheduled_ts - m.queued_ts) * 1e3) if m and m.scheduled_ts else 0.0
            self.stats.queue_waits.append(run.queue_wait_ms)
            self.stats.prompt_tokens += len(run.req.prompt_ids)
        cached = out.num_cached_tokens or 0
        if run.req.program is not None:
            run.req.program.computed(len(run.req.prompt_ids) - cached)
        self.stats.prefix_lookups += 1
        if cached:
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += cached

    def _finish(self, run: Run, finish: Finish, snapshot_id: str = "") -> None:
        with self._lock:
            if self._live.pop(run.req.request_id, None) is None:
                return                        # already ended
        now = time.monotonic()
        run.detok.flush(run.ids)
        rest = run.detok.rest()
        if rest or run.lp_sent < len(run.logprobs):
            run.handle.put(TextDelta(rest, len(run.ids), logprobs=run.logprobs[run.lp_sent:]))
            run.lp_sent = len(run.logprobs)
        r = run.req
        run.handle.put(Final(
            text=run.detok.text, finish=finish, prompt_tokens=len(r.prompt_ids), completion_tokens=len(run.ids),
            queue_wait_ms=max(run.queue_wait_ms, 0.0), ttft_ms=((run.first_token_at or now) - r.arrival) * 1e3,
            total_ms=(now - r.arrival) * 1e3, token_ids=list(run.ids), preemptions=run.preemptions,
            snapshot_id=snapshot_id, logprobs=list(run.logprobs), prompt_logprobs=run.prompt_logprobs))
        self.stats.completed += 1
        if finish == Finish.CANCELLED:
            self.stats.cancelled += 1

    def _fail(self, run: Run, message: str) -> None:
        with self._lock:
            self._live.pop(run.req.request_id, None)
        run.handle.put(Failed(message))

    async def _watch(self) -> None:
        """Cancelled handles (a client gone, a Cancel syscall): abort their vLLM requests."""
        while True:
            await asyncio.sleep(WATCH_S)
            for run in [r for r in list(self._live.values()) if r.handle.cancelled]:
                await self._stop_task(run, "cancel")
                if run.req.request_id in self._live:
                    self._finish(run, Finish.CANCELLED)

    async def _stop_task(self, run: Run, why: str) -> None:
        if run.task is not None and not run.task.done():
            run.stopping = why
            run.task.cancel()
            try:
                await run.task
            except asyncio.CancelledError:
                pass

    def _find(self, request_id: str) -> Run:
        run = self._live.get(request_id)
        if run is None:
            raise StatusError("NOT_FOUND", f"generation '{request_id}' has already finished")
        return run

    async def _load_adapter(self, name: str, folder: Path) -> list[str]:
        from vllm.lora.request import LoRARequest

        if not self.args.get("enable_lora"):
            raise StatusError("FAILED_PRECONDITION", f"model '{self.name}' runs on vLLM with enable_lora = false")
        self._lora_ids += 1
        lora = LoRARequest(name, self._lora_ids, str(folder))
        await self.llm.add_lora(lora)        # loads and checks it now (rank, target modules), not on first use
        self._loras[name] = lora
        if name not in self.adapters:
            self.adapters.append(name)
        return list(self.adapters)

    async def _close(self) -> None:
        for run in list(self._live.values()):
            await self._stop_task(run, "cancel")
            if run.req.request_id in self._live:
                self._finish(run, Finish.CANCELLED)
        await asyncio.to_thread(self.llm.shutdown)
