"""Publishing a trained adapter: the rule (it must beat the base model on the held-out split), then the store,
the hot-load into the running engine, and the agent's default."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..llm.types import AdapterInUse
from .retention import within

log = logging.getLogger("kernos.tuner")


def beats_base(base: dict, tuned: dict, min_improvement: float = 0.0) -> tuple[bool, str]:
    """Publish only if the held-out loss fell by more than `min_improvement` (a fraction of the base loss)
    and task accuracy, where the data set has answers, did not fall."""
    bl, tl = base.get("loss"), tuned.get("loss")
    if bl is None or tl is None:
        return False, "no held-out loss to compare (the eval split is empty or has no assistant tokens)"
    gain = (bl - tl) / bl if bl else 0.0
    numbers = f"held-out loss {bl:.4f} -> {tl:.4f} ({gain:+.1%})"
    ba, ta = base.get("accuracy"), tuned.get("accuracy")
    if ba is not None and ta is not None:
        numbers += f", accuracy {ba:.3f} -> {ta:.3f}"
        if ta < ba:
            return False, f"not published: accuracy fell; {numbers}"
    if gain <= min_improvement:
        return False, f"not published: the loss gain is not above {min_improvement:.1%}; {numbers}"
    return True, numbers


class Publisher:
    """What happens when a job finishes training: publish the adapter to the store if it beats the base,
    hot-load it into the running engine, and make it the agent's default if the job asked for it. Also
    serves every published adapter again when the kernel starts."""

    def __init__(self, llm, store, retention=None):
        self.llm = llm
        self.store = store            # the adapter store
        self.retention = retention    # RetentionConfig: its bounds gate publishing
        self._served: dict[str, int] = {}     # served name -> the version loaded on this node

    def serve_published(self) -> None:
        for v in self.store.latest():
            self.serve(v)

    def sync(self) -> int:
        """Serve what another node of a cluster published since the last look (its newest versions); the
        number of adapters loaded. Called at every cluster heartbeat."""
        if not self.store.changed():
            return 0
        fresh = [v for v in self.store.latest() if self._served.get(v.served_name) != v.version]
        loaded = sum(1 for v in fresh if self.serve(v))
        if loaded:
            log.info("loaded %d adapter(s) published on another node", loaded)
        return loaded

    def serve(self, v) -> bool:
        served = self.llm.models.get(v.model)
        if served is None or not hasattr(served.engine, "load_adapter"):
            log.warning("adapter %s v%d: model '%s' is not served; not loaded", v.served_name, v.version, v.model)
            self._served[v.served_name] = v.version        # (not asked again until a new version)
            return False
        deadline = time.monotonic() + 300
        while True:
            try:
                served.engine.load_adapter(v.served_name, self.store.local(v)).result(timeout=300)
                self._served[v.served_name] = v.version
                return True
            except AdapterInUse:            # the previous version still serves requests
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def finish_job(self, job, result: dict) -> tuple[str, str]:
        better, why = beats_base(result["base"], result["tuned"], job.min_improvement)
        if job.start_from:
            why = f"{why} (its base: the base model with {job.start_from}, the adapter it continued)"
        if not better:
            return "rejected", why
        numbers = result.get("retention")
        if numbers and self.retention is not None:
            kept, how = within(numbers, self.retention.min_agreement, self.retention.max_kl)
            if not kept:
                return "rejected", f"not published: it forgets what the base model did; {how}; task: {why}"
            why = f"{why}; {how}"
        v = self.store.publish(job.owner, job.name, job.model, Path(result["adapter"]),
                               {"base": result["base"], "tuned": result["tuned"], "steps": result["step"],
                                "method": result.get("method", "sft"), "retention": numbers,
                                "start_from": job.start_from}, job.job_id)
        job.adapter, job.version = v.served_name, v.version
        if not self.serve(v):
            return "published", f"{why}; stored as {v.served_name} v{v.version}, but its model is not served now"
        if job.set_default:
            self.store.set_default(job.owner, job.model, v.served_name)
        return "published", f"{why}; serving {job.model}/{v.served_name} v{v.version}" + (
            " as the agent's default" if job.set_default else "")
