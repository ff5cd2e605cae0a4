"""The Tuner service: converts to and from the data-set and tuner use cases."""
from __future__ import annotations

import json

from kernos.proto.v1 import tuner_pb2 as pb
from kernos.proto.v1 import tuner_pb2_grpc as rpc

from ...syscalls.datasets import Datasets, DatasetSpec, RagQuestion
from ...syscalls.tuner import FinetuneSpec, Outcome, Tuner
from ...tuner.jobs import Job
from .interceptor import current_principal


def _eval(d: dict) -> pb.Eval:
    return pb.Eval(loss=d.get("loss"), accuracy=d.get("accuracy"), examples=d.get("examples") or 0)


def job_message(j: Job) -> pb.Job:
    return pb.Job(job_id=j.job_id, owner=j.owner, name=j.name, dataset=j.dataset, model=j.model, state=j.state,
                  step=j.step, total_steps=j.total_steps, loss=j.loss, steps_per_s=j.steps_per_s, eta_s=j.eta_s,
                  base=_eval(j.base), tuned=_eval(j.tuned), adapter=j.adapter, version=j.version, message=j.message,
                  peak_rss_mb=j.peak_rss_mb, created=j.created, started=j.started, finished=j.finished,
                  config_json=json.dumps(j.config), resumed_from_step=j.resumed_from_step,
                  method=j.method, retention_json=json.dumps(j.retention) if j.retention else "",
                  start_from=j.start_from)


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def outcome(r: pb.FeedbackRequest) -> Outcome:
    return Outcome(r.request_id, _opt(r, "reward"), _opt(r, "success"), r.note, r.preferred)


def dataset_spec(r: pb.BuildDatasetRequest) -> DatasetSpec:
    return DatasetSpec(r.name, r.kind, r.eval_fraction, _opt(r, "min_reward"), r.samples, r.reward_regex, r.temperature,
                       r.model, r.max_tokens, [RagQuestion(i.question, i.oracle_id, i.answer) for i in r.items],
                       r.distractors, _opt(r, "oracle_fraction"), r.seed, r.reward, r.adapter)


def finetune_spec(r: pb.FinetuneRequest) -> FinetuneSpec:
    return FinetuneSpec(r.name, r.dataset, r.model, r.config_json, r.set_default, r.min_improvement, r.method,
                        r.start_from)


class TunerServicer(rpc.TunerServicer):
    def __init__(self, datasets: Datasets, tuner: Tuner):
        self.datasets = datasets
        self.tuner = tuner

    async def Feedback(self, r, context):
        return pb.FeedbackReply(outcomes=await self.tuner.feedback(current_principal(), outcome(r)))

    async def BuildDataset(self, r, context):
        card, train, evals, version = await self.datasets.build(current_principal(), dataset_spec(r))
        return pb.DatasetInfo(name=r.name, train=train, eval=evals, version=version, card_json=json.dumps(card))

    async def StartFinetune(self, r, context):
        return job_message(await self.tuner.start(current_principal(), finetune_spec(r)))

    async def GetJob(self, r, context):
        return job_message(await self.tuner.job(current_principal(), r.job_id))

    async def ListJobs(self, r, context):
        return pb.JobList(jobs=[job_message(j) for j in await self.tuner.list_jobs(current_principal(), r.all_agents)])

    async def CancelJob(self, r, context):
        return job_message(await self.tuner.cancel(current_principal(), r.job_id))

    async def ListAdapters(self, r, context):
        return pb.AdapterList(adapters=[
            pb.Adapter(name=v.served_name, owner=v.owner, version=v.version, model=v.model,
                       base=_eval(v.metrics.get("base", {})), tuned=_eval(v.metrics.get("tuned", {})), job_id=v.job_id,
                       created=v.created, loaded=loaded, is_default=is_default)
            for v, loaded, is_default in await self.tuner.adapters(current_principal())])

    async def Continual(self, r, context):
        state = await self.tuner.continual_tuning(current_principal(), r.spec_json)
        return pb.ContinualState(state_json=json.dumps(state) if state is not None else "")

    async def SetDefaultAdapter(self, r, context):
        model = await self.tuner.set_default_adapter(current_principal(), r.model, r.adapter)
        return pb.DefaultAdapterReply(model=model, adapter=r.adapter)
