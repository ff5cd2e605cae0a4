"""`kernos finetune`: start a fine-tuning job on an agent's data set, follow its progress, cancel it, list
adapters; through the SDK, as the agent whose token it is given (an operator's token sees every agent's jobs)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .address import address


def cmd_finetune(args) -> int:
    """Fine-tuning jobs: start one on an agent's data set, watch progress, cancel, list adapters."""
    import kernos.sdk

    token = args.token or os.environ.get("KERNOS_TOKEN")
    if not token:
        print("kernos finetune: a token is needed: --token or KERNOS_TOKEN (the agent's token; an operator "
              "token shows every agent's jobs)", file=sys.stderr)
        return 2
    try:
        # Not `with`: leaving it would end the session of the agent that lent us its token.
        s = kernos.sdk.connect(address(args), token=token, timeout=args.timeout, tls_ca=args.tls_ca,
                               tls_cert=args.tls_cert, tls_key=args.tls_key)
        try:
            return _finetune(args, s, operator="admin" in s.access.capabilities())
        finally:
            s.close()
    except (kernos.sdk.KernosError, ValueError, OSError) as e:
        print(f"kernos finetune {args.action}: {e}", file=sys.stderr)
        return 1


def _finetune(args, s, operator: bool) -> int:
    from .top import job_table

    def table(jobs):
        print("\n".join(job_table(jobs)))
    if args.action == "status":
        jobs = [s.tuner.job(args.job_id)] if args.job_id else s.tuner.jobs(all_agents=operator)
        if args.json:
            print(json.dumps([j.model_dump() for j in jobs], indent=2))
        elif jobs:
            table(jobs)
        else:
            print("no fine-tuning jobs")
        return 0
    if args.action == "cancel":
        table([s.tuner.cancel(args.job_id)])
        return 0
    if args.action == "continual":
        st = s.tuner.continual()
        if st is None:
            print("continual tuning is not configured for this agent (s.tuner.continual(...))")
            return 0
        if args.json:
            print(json.dumps(st, indent=2))
            return 0
        spec = st["spec"]
        print(f"{st['agent_id']}: {'on' if spec['enabled'] else 'off'}, kind {spec['kind']}, round {st['round']}, "
              f"phase {st['phase']}" + (f", candidate {st['candidate']} against {st['current'] or 'the base'}"
                                        if st["phase"] == "canary" else ""))
        print(f"  {st['message']}")
        for h in st["history"]:
            print(f"  round {h['round']}: {h['outcome']}: {h['detail'][:200]}")
        return 0
    if args.action == "adapters":
        for a in s.tuner.adapters():
            acc = (f"accuracy {a.base.accuracy:.2f} -> {a.tuned.accuracy:.2f}, "
                   if a.tuned.accuracy is not None and a.base.accuracy is not None else "")
            print(f"{a.model}/{a.name} v{a.version}  {acc}loss {a.base.loss:.3f} -> {a.tuned.loss:.3f}"
                  f"{'  loaded' if a.loaded else ''}{'  default' if a.is_default else ''}")
        return 0
    config = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).exists() else args.config
        config = json.loads(text)
    job = s.tuner.finetune(args.name, args.dataset, model=args.model or "", config=config,
                           set_default=args.set_default, min_improvement=args.min_improvement,
                           method=args.method or "", start_from=args.start_from or "")
    print(f"job {job.job_id} queued: adapter '{job.name}' on '{job.model}' from data set '{job.dataset}' "
          f"({job.method}{', continuing ' + job.start_from if job.start_from else ''})")
    if not args.wait:
        return 0
    last = None
    while not job.done:
        time.sleep(1.0)
        job = s.tuner.job(job.job_id)
        line = (f"{job.state} step {job.step}/{job.total_steps}"
                + (f" loss {job.loss:.4f}" if job.loss is not None else "")
                + (f" {job.steps_per_s:.1f} steps/s ETA {job.eta_s:.0f} s" if job.eta_s else "")
                + (f" ({job.message})" if job.message else ""))
        if line != last:
            print(line, flush=True)
            last = line
    table([job])
    return 0 if job.state == "published" else 1
