"""Rendering of kernel stats for `kernos status` (one frame) and `kernos top` (refreshing)."""

from __future__ import annotations

import time
from collections import defaultdict


def node_table(st) -> list[str]:
    """The cluster: this node, and (operators) every node with its lease."""
    head = (f"cluster node {st.node_id}: {st.forwarded} calls forwarded to home nodes, "
            f"{st.served_for_unreachable} served for an unreachable home")
    if not st.nodes:
        return [head]
    lines = [head, f"{'node':<28}{'state':<10}{'alive':<7}{'beat s':>7}{'up s':>8}  {'grpc':<22}models"]
    for n in st.nodes:
        mark = "*" if n.node_id == st.node_id else " "
        lines.append(f"{mark}{n.node_id[:27]:<27}{n.state:<10}{'yes' if n.alive else 'NO':<7}"
                     f"{n.heartbeat_age_s:>7.1f}{n.uptime_s:>8.0f}  {n.grpc_address[:21]:<22}{','.join(n.models)}")
    return lines


def render(st, detail: bool = True) -> str:
    lines = [
        f"kernos {st.version}  uptime {st.uptime_s:.0f} s  active agents {st.active_agents}  "
        f"syscalls {st.syscalls}  in flight {st.in_flight}"
    ]
    lines.append(
        f"{'model':<24}{'policy':<12}{'run':>4}{'wait':>5}{'pre':>4}{'susp':>5}{'done':>6}{'tok/s':>8}"
        f"{'batch':>6}{'queue ms':>9}{'cache MB':>9}{'switches':>9}{'swap/rec':>9}{'sw ms':>8}"
        f"{'resident MB':>12}{'hit %':>6}{'reused':>8}{'draft %':>8}"
    )
    for m in st.models:
        mark = "*" if m.name == st.default_model else " "
        budget = f"/{m.cache_budget_bytes / 2**20:.0f}" if m.cache_budget_bytes else ""
        lines.append(
            f"{mark}{m.name[:23]:<23}{(m.policy or '-')[:11]:<12}{m.running:>4}"
            f"{m.waiting - m.preempted - m.suspended:>5}"
            f"{m.preempted:>4}{m.suspended:>5}{m.completed:>6}{m.tokens_per_s:>8.1f}{m.mean_batch_size:>6.2f}"
            f"{m.queue_wait_ms:>9.1f}"
            f"{m.cache_bytes / 2**20:>6.1f}{budget:<3}{m.context_switches:>9}{f'{m.swaps}/{m.recomputes}':>9}"
            f"{m.switch_ms:>8.1f}{m.resident_bytes / 2**20:>12.1f}"
            f"{(100 * m.prefix_hits / m.prefix_lookups if m.prefix_lookups else 0):>6.0f}{m.prefix_tokens_reused:>8}"
            f"{(f'{100 * m.draft_accepted / m.draft_tokens:.0f}' if m.draft_tokens else '-'):>8}"
        )
    active = [j for j in st.tuner_jobs if j.state in ("queued", "running")]
    if active or (detail and st.tuner_jobs):
        lines.append("")
        lines += job_table(active if not detail else sorted(st.tuner_jobs, key=lambda j: -j.created)[:10])
    if st.programs:
        lines.append("")
        lines += program_table(st.programs)
    if st.node_id:
        lines.append("")
        lines += node_table(st)
    if not detail:
        return "\n".join(lines)
    per_agent = defaultdict(lambda: defaultdict(int))
    rows = []
    for m in st.models:
        for r in m.requests:
            per_agent[r.agent_id][r.state] += 1
            rows.append((m.name, r))
    lines.append("")
    lines.append(f"{'agent':<24}{'running':>8}{'waiting':>8}{'preempted':>10}{'suspended':>10}")
    for agent in sorted(per_agent):
        c = per_agent[agent]
        lines.append(f"{agent[:23]:<24}{c['running']:>8}{c['waiting']:>8}{c['preempted']:>10}{c['suspended']:>10}")
    lines.append("")
    lines.append(
        f"{'request':<14}{'agent':<20}{'model':<16}{'state':<10}{'prio':>5}{'prompt':>7}{'gen':>6}"
        f"{'age ms':>9}{'preempt':>8}{'cache KB':>9}"
    )
    for model, r in sorted(rows, key=lambda x: -x[1].age_ms)[:40]:
        lines.append(
            f"{r.request_id[:12]:<14}{r.agent_id[:19]:<20}{model[:15]:<16}{r.state:<10}{r.priority:>5}"
            f"{r.prompt_tokens:>7}{r.generated_tokens:>6}{r.age_ms:>9.0f}{r.preemptions:>8}"
            f"{r.cache_bytes / 1024:>9.0f}"
        )
    return "\n".join(lines)


def _get(obj, name):
    """A field of a proto message (None when unset) or of an SDK model (None when absent)."""
    if hasattr(obj, "HasField"):
        return getattr(obj, name) if obj.HasField(name) else None
    return getattr(obj, name)


def _eval(e) -> str:
    if not e.examples:
        return "-"
    loss, acc = _get(e, "loss"), _get(e, "accuracy")
    return (f"loss {loss:.3f}" if loss is not None else "loss -") + (f" acc {acc:.2f}" if acc is not None else "")


def job_table(jobs) -> list[str]:
    """Fine-tuning jobs (Stats protos or SDK JobInfo): progress (steps, loss, ETA), evaluations before/after."""
    lines = [
        f"{'job':<18}{'agent/adapter':<28}{'model':<14}{'method':<7}{'state':<11}"
        f"{'step':>12}{'loss':>8}{'steps/s':>8}"
        f"{'ETA s':>7}  {'base':<22}{'tuned':<22}"
    ]
    for j in jobs:
        eta, loss = _get(j, "eta_s"), _get(j, "loss")
        eta = f"{eta:.0f}" if eta is not None and j.state == "running" else "-"
        loss = f"{loss:.3f}" if loss is not None else "-"
        lines.append(
            f"{j.job_id:<18}{(j.owner + '/' + j.name)[:27]:<28}{j.model[:13]:<14}"
            f"{(getattr(j, 'method', '') or 'sft'):<7}{j.state:<11}"
            f"{f'{j.step}/{j.total_steps}':>12}{loss:>8}{j.steps_per_s:>8.1f}{eta:>7}  "
            f"{_eval(j.base):<22}{_eval(j.tuned):<22}"
        )
        if j.message:
            lines.append(f"{'':<18}{j.message[:120]}")
    return lines


def top(session, interval: float, once: bool, out) -> None:
    while True:
        frame = render(session.kernel.stats())
        if once:
            print(frame, file=out)
            return
        out.write("\x1b[H\x1b[2J" + frame + f"\n\nrefreshing every {interval:g} s; Ctrl-C to quit\n")
        out.flush()
        time.sleep(interval)


def program_table(programs) -> list[str]:
    """Agent programs, the busiest (most tokens computed) first."""
    lines = [f"{'program':<30}{'agent':<20}{'state':<9}{'calls':>6}{'tokens':>9}{'pauses':>7}{'pause s':>9}"
             f"  waits on"]
    for p in sorted(programs, key=lambda p: -p.service_tokens)[:20]:
        lines.append(f"{p.program_id[:29]:<30}{p.agent_id[:19]:<20}{p.state:<9}{p.calls:>6}{p.service_tokens:>9}"
                     f"{p.tool_pauses:>7}{p.tool_pause_s:>9.1f}  {', '.join(p.paused_on)[:40]}")
    return lines
