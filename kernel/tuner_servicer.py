"""The Tuner service: outcomes on traced generations, and data sets built from them into storage."""
from __future__ import annotations

import asyncio
import json
import math
import re

from kernos.proto.v1 import tuner_pb2 as pb
from kernos.proto.v1 import tuner_pb2_grpc as rpc
from kernos.storage.status import StatusError
from kernos.storage.traces import TraceRecord

from .auth import current_agent
from .errors import syscall
from .kernel import Kernel
from .tuner.datasets import build_sft, episodes_from_traces

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
DATASET_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")


class TunerServicer(rpc.TunerServicer):
    def __init__(self, kernel: Kernel):
        self.k = kernel

    @syscall
    async def Feedback(self, request, context):
        agent = current_agent()
        if not REQUEST_ID.match(request.request_id):
            raise StatusError("INVALID_ARGUMENT", "request_id must be the 32 hex characters of a generation's reply")
        reward = request.reward if request.HasField("reward") else None
        success = request.success if request.HasField("success") else None
        if reward is None and success is None:
            raise StatusError("INVALID_ARGUMENT", "give a reward, a success flag, or both")
        if reward is not None and not math.isfinite(reward):
            raise StatusError("INVALID_ARGUMENT", "reward must be a finite number")
        for _ in range(40):  # the trace writer is asynchronous: a generation just answered may be a moment away
            if await asyncio.to_thread(self.k.traces.has_generation, agent.agent_id, request.request_id):
                break
            await asyncio.sleep(0.05)
        else:
            raise StatusError("NOT_FOUND", f"no generation '{request.request_id}' of '{agent.agent_id}' in the traces")
        n = await asyncio.to_thread(self.k.traces.add_outcome, agent.agent_id, request.request_id, reward, success,
                                    request.note)
        return pb.FeedbackReply(outcomes=n)

    @syscall
    async def BuildDataset(self, request, context):
        agent = current_agent()
        if not DATASET_NAME.match(request.name):
            raise StatusError("INVALID_ARGUMENT", "data set names are 1-64 characters of a-z, 0-9, '_', '.', '-'")
        if request.kind != "sft":
            raise StatusError("INVALID_ARGUMENT", f"kind '{request.kind[:32]}': only 'sft' is built so far")
        frac = request.eval_fraction or 0.1
        if not 0 <= frac <= 0.5:
            raise StatusError("INVALID_ARGUMENT", "eval_fraction must be between 0 and 0.5")
        min_reward = request.min_reward if request.HasField("min_reward") else None
        traces = await asyncio.to_thread(self.k.traces.query, agent.agent_id, "llm.generate", 1_000_000)
        outcomes = await asyncio.to_thread(self.k.traces.outcomes, agent.agent_id)
        train, evals, card = build_sft(episodes_from_traces(traces, outcomes), min_reward, frac)
        card["name"] = request.name

        def jsonl(rows):
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        base = f"datasets/{request.name}"
        info = await asyncio.to_thread(self.k.files.write, agent.agent_id, f"{base}.train.jsonl", jsonl(train),
                                       {"kind": "dataset"})
        await asyncio.to_thread(self.k.files.write, agent.agent_id, f"{base}.eval.jsonl", jsonl(evals),
                                {"kind": "dataset"})
        card["files"] = {"train": f"{base}.train.jsonl", "eval": f"{base}.eval.jsonl", "version": info.version}
        await asyncio.to_thread(self.k.files.write, agent.agent_id, f"{base}.card.json",
                                json.dumps(card, indent=2).encode(), {"kind": "dataset-card"})
        self.k.traces.record(TraceRecord(agent.agent_id, "tuner.build_dataset", "OK", {"name": request.name},
                                         {"train": len(train), "eval": len(evals)}, {}))
        return pb.DatasetInfo(name=request.name, train=len(train), eval=len(evals), version=info.version,
                              card_json=json.dumps(card))
