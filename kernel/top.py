"""Rendering of kernel stats for `kernos status` (one frame) and `kernos top` (refreshing)."""
from __future__ import annotations

import time
from collections import defaultdict


def render(st, detail: bool = True) -> str:
    lines = [f"kernos {st.version}  uptime {st.uptime_s:.0f} s  active agents {st.active_agents}  "
             f"syscalls {st.syscalls}  in flight {st.in_flight}"]
    lines.append(f"{'model':<24}{'policy':<12}{'run':>4}{'wait':>5}{'pre':>4}{'susp':>5}{'done':>6}{'tok/s':>8}"
                 f"{'batch':>6}{'queue ms':>9}{'cache MB':>9}{'switches':>9}{'swap/rec':>9}{'sw ms':>8}")
    for m in st.models:
        mark = "*" if m.name == st.default_model else " "
        budget = f"/{m.cache_budget_bytes / 2**20:.0f}" if m.cache_budget_bytes else ""
        lines.append(
            f"{mark}{m.name[:23]:<23}{(m.policy or '-')[:11]:<12}{m.running:>4}{m.waiting - m.preempted - m.suspended:>5}"
            f"{m.preempted:>4}{m.suspended:>5}{m.completed:>6}{m.tokens_per_s:>8.1f}{m.mean_batch_size:>6.2f}"
            f"{m.queue_wait_ms:>9.1f}"
            f"{m.cache_bytes / 2**20:>6.1f}{budget:<3}{m.context_switches:>9}{f'{m.swaps}/{m.recomputes}':>9}"
            f"{m.switch_ms:>8.1f}")
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
    lines.append(f"{'request':<14}{'agent':<20}{'model':<16}{'state':<10}{'prio':>5}{'prompt':>7}{'gen':>6}"
                 f"{'age ms':>9}{'preempt':>8}{'cache KB':>9}")
    for model, r in sorted(rows, key=lambda x: -x[1].age_ms)[:40]:
        lines.append(f"{r.request_id[:12]:<14}{r.agent_id[:19]:<20}{model[:15]:<16}{r.state:<10}{r.priority:>5}"
                     f"{r.prompt_tokens:>7}{r.generated_tokens:>6}{r.age_ms:>9.0f}{r.preemptions:>8}"
                     f"{r.cache_bytes / 1024:>9.0f}")
    return "\n".join(lines)


def top(session, interval: float, once: bool, out) -> None:
    while True:
        frame = render(session.kernel.stats())
        if once:
            print(frame, file=out)
            return
        out.write("\x1b[H\x1b[2J" + frame + f"\n\nrefreshing every {interval:g} s; Ctrl-C to quit\n")
        out.flush()
        time.sleep(interval)
