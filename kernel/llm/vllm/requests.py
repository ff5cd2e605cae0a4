"""A Kernos generation request in vLLM's terms, and back: its SamplingParams, and the prompt's log-probabilities
vLLM scored."""
from __future__ import annotations

from ..types import GenRequest


def sampling_params(req: GenRequest, produced: int):
    """vLLM's SamplingParams for `req`, of which `produced` tokens exist already (a resumed run: they are prompt
    to vLLM now, so the length floor counts them; frequency and presence penalties see only the new output).
    A request that only scores its prompt (max_tokens 0) asks for one token, which is not its reply's."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    grammar = req.output.grammar() if req.output is not None else None
    x = req.shaping
    return SamplingParams(
        max_tokens=max(req.max_tokens - produced, 1), temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k or 0, seed=req.seed, logprobs=(req.top_logprobs if req.logprobs else None),
        prompt_logprobs=(req.top_logprobs if req.prompt_logprobs and not produced else None), detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=StructuredOutputsParams(grammar=grammar) if grammar else None,
        frequency_penalty=x.frequency_penalty, presence_penalty=x.presence_penalty,
        repetition_penalty=x.repetition_penalty, logit_bias=dict(x.logit_bias) or None, min_p=x.min_p,
        stop_token_ids=list(x.stop_token_ids), min_tokens=max(0, x.min_tokens - produced), ignore_eos=x.ignore_eos)


def prompt_logprobs(req: GenRequest, scored: list) -> list:
    """vLLM's prompt logprobs (None, then {token id: Logprob} per position) as the engine's
    [(id, logprob or None, [(id, logprob)] * top)], the top alternatives by vLLM's rank."""
    out = [(req.prompt_ids[0], None, [])]
    for t, step in zip(req.prompt_ids[1:], scored[1:]):
        top = sorted(step.items(), key=lambda kv: kv[1].rank)[: req.top_logprobs]
        out.append((t, float(step[t].logprob), [(a, float(lp.logprob)) for a, lp in top]))
    return out
