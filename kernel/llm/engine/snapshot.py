"""The snapshot format: a folder with `state.json` (the request with its output spec, its tokens, position,
sampling generator state and streamed length; a grammar's state is rebuilt by replaying the tokens) and,
when it held one, `cache.safetensors`. Written to a temporary folder, fsynced and renamed into place, so a
snapshot on disk is always whole."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..types import GenRequest, Shaping
from . import cache as cache_ops


def write(directory: Path, seq, model: str, past) -> None:
    state = {**request_state(seq.req, model), "ids": seq.ids, "pending": seq.pending, "position": seq.position,
             "emitted": len(seq.text), "preemptions": seq.preemptions, "has_cache": past is not None,
             "generator": seq.gen.get_state().tolist(), "logprobs": seq.logprobs}
    write_folder(directory, state, past)


def request_state(r: GenRequest, model: str) -> dict:
    """The request's part of a snapshot's state (what `request` reads back)."""
    return {"request_id": r.request_id, "agent_id": r.agent_id, "model": model, "prompt_ids": r.prompt_ids,
            "max_tokens": r.max_tokens, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
            "stop": r.stop, "seed": r.seed, "adapter": r.adapter, "priority": r.priority,
            "output": r.output.to_dict() if r.output is not None else None,
            "logprobs_on": r.logprobs, "top_logprobs": r.top_logprobs, "shaping": r.shaping.to_dict()}


def write_folder(directory: Path, state: dict, past=None) -> None:
    """`state.json` (and the cache, if any) into a temporary folder, fsynced, then renamed into place."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if past is not None:
        cache_ops.save(past, tmp / "cache.safetensors")
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def read_state(directory: Path) -> dict:
    return json.loads((directory / "state.json").read_text())


def request(directory: Path, request_id: str) -> GenRequest:
    """The snapshotted request, under a new id."""
    from ..structured import OutputSpec

    st = read_state(directory)
    return GenRequest(request_id=request_id, agent_id=st["agent_id"], prompt_ids=st["prompt_ids"],
                      max_tokens=st["max_tokens"], temperature=st["temperature"], top_p=st["top_p"],
                      top_k=st["top_k"], stop=st["stop"], seed=st["seed"], adapter=st["adapter"],
                      priority=st["priority"], output=OutputSpec.from_dict(st.get("output")),
                      logprobs=st.get("logprobs_on", False), top_logprobs=st.get("top_logprobs", 0),
                      shaping=Shaping.from_dict(st.get("shaping")))


def resume_into(seq, directory: Path) -> None:
    """Give a new sequence the snapshot's state: it continues where the snapshotted one stopped."""
    state = read_state(directory)
    seq.gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    seq.ids, seq.pending, seq.position = list(state["ids"]), state["pending"], state["position"]
    seq.detok.restore(seq.ids, state["emitted"])
    seq.logprobs = [(t, lp, [tuple(x) for x in top]) for t, lp, top in state.get("logprobs", [])]
    if seq.matcher is not None and not seq.matcher.consume_tokens(seq.ids):   # the grammar's state, replayed
        raise ValueError(f"snapshot {directory.name}: its tokens do not follow its grammar")
    seq.preemptions, seq.state = state["preemptions"], "preempted"
    if state["has_cache"]:
        seq.swap_path, seq.keep_swap_file = directory / "cache.safetensors", True
