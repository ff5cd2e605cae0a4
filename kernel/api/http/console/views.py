"""What each console page shows, read through the kernel's use cases with the logged-in principal, and the
console's few actions (cancel a generation, confirm or deny a tool call, cancel a fine-tune job, roll a file
back). Every page and action is admitted by the gate under the gRPC method it corresponds to, so the
capabilities, grants, audit log and least exposure are those of the syscalls: an agent sees only its own
requests, calls, jobs, contexts, memory and files; operators see everyone's and may act on them.

Pages return plain JSON-able dicts; the browser renders them (`static/console.js`)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

from kernos.abi.errors import StatusError
from kernos.abi.syscalls import syscall

PAGES = ("overview", "agents", "requests", "contexts", "memory", "files", "tools", "tuning", "audit")
OPERATOR_PAGES = {"audit"}
# page -> the syscall it stands for at the gate
# page -> the syscall it is (its admission decides who sees it)
PAGE_SYSCALLS = {"overview": "kernel.stats", "requests": "kernel.stats", "agents": "kernel.list_agents",
                 "contexts": "memory.list_contexts", "memory": "memory.search", "files": "storage.list",
                 "tools": "tools.list", "tuning": "tuner.list_jobs", "audit": "access.audit"}
# action -> the syscall it is
ACTION_SYSCALLS = {"cancel-request": "llm.suspend", "confirm": "tools.confirm", "deny": "tools.deny",
                   "cancel-job": "tuner.cancel_job", "rollback": "storage.rollback"}


def clean(x):
    """JSON the browser can parse: no NaN or infinities."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def _int(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    try:
        v = int(params.get(key) or default)
    except ValueError:
        raise StatusError("INVALID_ARGUMENT", f"{key} must be an integer") from None
    if not lo <= v <= hi:
        raise StatusError("INVALID_ARGUMENT", f"{key} must be between {lo} and {hi}")
    return v


@dataclass
class ConsoleDeps:
    """What the console uses: the use cases its pages and actions call, and the state they show."""
    agents: object           # syscalls.agents.Agents
    generate: object
    memory: object
    storage: object          # syscalls.files.Files
    tools: object            # the tool manager
    tuner: object
    access: object           # syscalls.access.Access
    access_control: object   # groups and capabilities of the agents shown
    adapters: object         # the adapter store: agents' default adapters
    registry: object         # the agent registry
    quotas: object
    models: object           # syscalls.models.Models
    metrics: object
    audit: object            # the audit log: console logins and actions
    lifecycle: object
    server: object           # the [server] settings


class Views:
    def __init__(self, deps: ConsoleDeps, edge, history):
        self.d = deps
        self.edge = edge
        self.history = history

    # -- who may see what ----------------------------------------------------------------------------------------
    def admit(self, principal, page: str, params: dict) -> None:
        if page not in PAGES:
            raise StatusError("NOT_FOUND", f"no console page '{page[:40]}'")
        if page in OPERATOR_PAGES and not principal.operator:
            raise StatusError("PERMISSION_DENIED", f"the {page} page is for operators")
        self.subject_id(principal, params.get("agent", ""))
        agent = params.get("agent") or principal.agent_id
        self.edge.admit(principal, syscall(PAGE_SYSCALLS[page], owner=agent, namespace=agent))

    @staticmethod
    def subject_id(principal, agent: str) -> str:
        """Whose resources a page shows: an agent's own only; any agent's (or "" for all) for operators."""
        if principal.operator:
            return agent
        if agent and agent != principal.agent_id:
            raise StatusError("PERMISSION_DENIED", "an agent's console shows only its own resources")
        return principal.agent_id

    def _agent(self, principal, agent: str):
        """The principal to read an agent-scoped store (contexts) as: the caller, or for operators the agent
        they picked."""
        who = self.subject_id(principal, agent)
        if not principal.operator or not who:
            if principal.operator:
                raise StatusError("INVALID_ARGUMENT", "pick an agent")
            return principal
        a = self.d.registry.get(who)
        if a is None:
            raise StatusError("NOT_FOUND", f"no agent '{who[:64]}'")
        return a

    async def page(self, principal, page: str, params: dict) -> dict:
        out = await getattr(self, page)(principal, params)
        return clean({"page": page, "at": time.time(), **out})

    # -- pages -------------------------------------------------------------------------------------------------
    async def overview(self, principal, params: dict) -> dict:
        s = await self.d.agents.stats(principal)
        models = [{"name": m.model.name, "architecture": m.model.architecture, "device": m.model.device,
                   "dtype": m.model.dtype, "policy": m.policy, "tokens_per_s": m.stats.tokens_per_s(),
                   "running": m.stats.running, "waiting": m.stats.waiting, "preempted": m.preempted,
                   "suspended": m.suspended, "cache_bytes": m.stats.cache_bytes,
                   "cache_budget_bytes": m.cache_budget_bytes, "context_switches": m.stats.context_switches,
                   "switch_ms": m.stats.switch_seconds * 1e3, "completed": m.stats.completed,
                   "generated_tokens": m.stats.generated_tokens, "adapters": list(m.model.adapters)}
                  for m in s.models]
        since = float(params.get("since") or 0)
        now = time.time()
        cluster = {"node_id": s.node_id, "forwarded": s.forwarded, "served_for_unreachable": s.served_for_unreachable,
                   "nodes": [{"node_id": n.node_id, "state": n.state, "alive": alive, "grpc_address": n.grpc_address,
                              "models": n.models, "heartbeat_age_s": now - n.heartbeat, "uptime_s": now - n.started}
                             for n, alive in s.nodes]} if s.node_id else None
        return {"version": s.version, "uptime_s": s.uptime_s, "active_agents": s.active_agents,
                "syscalls": s.syscalls, "in_flight": s.in_flight, "default_model": s.default_model,
                "models": models, "series": self.history.series(since), "period_s": self.history.period_s,
                "cluster": cluster}

    async def agents(self, principal, params: dict) -> dict:
        k = self.d
        exited = params.get("exited") in ("1", "true", "on")
        agents = await k.agents.list(principal, exited)
        agents.sort(key=lambda a: ({"active": 0, "idle": 1}.get(a.state, 2), -a.last_seen))
        grants = await k.access.grants(principal, False)
        rows = []
        for a in agents[:500]:
            aid = a.agent_id
            rows.append({
                "agent_id": aid, "description": a.description, "state": a.state, "labels": a.labels,
                "registered_at": a.registered_at, "last_seen": a.last_seen, "syscalls": a.syscalls,
                "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
                "groups": sorted(k.access_control.groups_of(aid)),
                "capabilities": list(k.access_control.capabilities(aid)),
                "quotas": k.quotas.usage(aid),
                "default_adapters": {m: d for m in k.models.names() if (d := k.adapters.default(aid, m))},
                "grants": [asdict(g) for g in grants if aid in (g.grantee, g.owner)]})
        return {"agents": rows, "total": len(agents), "operator": principal.operator}

    async def requests(self, principal, params: dict) -> dict:
        s = await self.d.agents.stats(principal)
        now = time.monotonic()
        live = [{"request_id": v.request_id, "agent_id": v.agent_id, "model": m.model.name, "state": state,
                 "priority": v.priority, "prompt_tokens": v.prompt_tokens, "generated_tokens": v.generated,
                 "max_tokens": v.max_tokens, "age_ms": (now - v.arrival) * 1e3, "preemptions": v.preemptions,
                 "waiting_ms": (now - v.enqueued) * 1e3 if state != "running" and v.enqueued else 0.0,
                 "cache_bytes": v.cache_bytes,
                 "ttft_ms": (v.first_token_at - v.arrival) * 1e3 if v.first_token_at else None}
                for m in s.models for v, state in m.live]
        mine = None if principal.operator else principal.agent_id
        recent = [r for r in reversed(self.d.metrics.recent) if mine is None or r["agent_id"] == mine][:50]
        return {"live": live, "recent": recent, "can_cancel": True}

    async def contexts(self, principal, params: dict) -> dict:
        if principal.operator and not params.get("agent"):
            return {"agent": "", "contexts": [], "note": "pick an agent to see its context windows"}
        subject = self._agent(principal, params.get("agent", ""))
        out = []
        resident = {m.name: {"bytes": m.engine.stats.resident_bytes, "entries": m.engine.stats.resident_entries,
                             "tokens_reused": m.engine.stats.prefix_tokens_reused}
                    for m in self.d.models.served()}
        for c in await self.d.memory.list_contexts(subject):
            blocks, total = await self.d.memory.blocks(subject, c.context_id)
            out.append({"context_id": c.context_id, "model": c.model, "budget_tokens": c.budget_tokens,
                        "summarize": c.summarize, "evicted": c.evicted, "prompt_tokens": total,
                        "resident": resident.get(c.model or self.d.models.default),   # model-wide, all contexts
                        "blocks": [{"block_id": b.block_id, "role": b.role, "kind": b.kind, "pinned": b.pinned,
                                    "label": b.label, "tokens": n, "content": b.content[:2000]}
                                   for b, n in blocks]})
        return {"agent": subject.agent_id, "contexts": out}

    async def memory(self, principal, params: dict) -> dict:
        agent = self.subject_id(principal, params.get("agent", ""))
        query = (params.get("q") or "").strip()
        if not query:
            return {"agent": agent, "query": "", "results": []}
        if principal.operator and not agent:
            raise StatusError("INVALID_ARGUMENT", "pick an agent whose memory to search")
        k = _int(params, "k", 5, 1, 50)
        hits = await self.d.memory.search(principal, query, k, None, agent)
        return {"agent": agent, "query": query,
                "results": [{"id": h.id, "text": h.text[:2000], "metadata": h.metadata, "distance": h.distance}
                            for h in hits]}

    async def files(self, principal, params: dict) -> dict:
        agent = self.subject_id(principal, params.get("agent", ""))
        if principal.operator and not agent:
            return {"agent": "", "files": [], "note": "pick an agent to see its files"}
        owner = "" if agent == principal.agent_id else agent
        out = {"agent": agent, "files": [asdict(f) for f in await self.d.storage.list(principal, "", owner)]}
        path = params.get("path") or ""
        if path:
            out["path"] = path
            out["history"] = [asdict(f) for f in await self.d.storage.history(principal, path, owner)]
            a, b = _int(params, "a", 0, 0, 1 << 30), _int(params, "b", 0, 0, 1 << 30)
            if a and b:
                out["diff"] = await self.d.storage.diff(principal, path, a, b, owner)
        return out

    async def tools(self, principal, params: dict) -> dict:
        t = self.d.tools
        mine = None if principal.operator else principal.agent_id
        now = time.monotonic()

        def row(c):
            return {"call_id": c.call_id, "tool": c.tool, "agent_id": c.agent_id, "state": c.state,
                    "args": json.dumps(c.args)[:500], "error": c.error[:500],
                    "result": (json.dumps(c.result)[:500] if c.result is not None else None),
                    "age_s": now - c.started, "duration_ms": c.duration_ms}
        calls = {c.call_id: c for c in list(t.log) + list(t.calls.values()) if mine is None or c.agent_id == mine}
        calls = sorted(calls.values(), key=lambda c: c.started, reverse=True)
        return {"pending": [row(c) for c in calls if c.state == "pending"],
                "log": [row(c) for c in calls[:200]], "can_confirm": principal.operator,
                "confirm_timeout_s": t.confirm_timeout_s}

    async def tuning(self, principal, params: dict) -> dict:
        jobs = await self.d.tuner.list_jobs(principal, principal.operator)
        adapters = await self.d.tuner.adapters(principal)
        return {"jobs": [{k: v for k, v in asdict(j).items() if k not in ("config", "model_path")}
                         for j in sorted(jobs, key=lambda j: j.created, reverse=True)],
                "adapters": [{"owner": v.owner, "name": v.name, "version": v.version, "model": v.model,
                              "metrics": v.metrics, "job_id": v.job_id, "created": v.created, "loaded": loaded,
                              "is_default": default} for v, loaded, default in adapters],
                "continual": [asdict(st) for a, st in sorted(self.d.tuner.continual.states.items())
                              if principal.operator or a == principal.agent_id]}

    async def audit(self, principal, params: dict) -> dict:
        limit = _int(params, "limit", 200, 1, 5000)
        who, text = params.get("who", ""), (params.get("text") or "").lower()
        denied = params.get("denied") in ("1", "true", "on")
        recs = await self.d.access.audit(who, limit if not text else 5000, denied)
        rows = [{"ts": r.ts, "agent_id": r.agent_id, "what": r.kind, "decision": r.status,
                 "capability": r.request.get("capability", ""), "reason": r.response.get("reason", "")}
                for r in recs]
        if text:
            rows = [r for r in rows if text in (r["what"] + " " + r["reason"] + " " + r["capability"]).lower()]
        return {"records": rows[:limit]}

    # -- actions -------------------------------------------------------------------------------------------------
    async def act(self, principal, action: str, body: dict) -> dict:
        k = self.d

        def arg(name: str) -> str:
            v = body.get(name)
            if not isinstance(v, str) or not v:
                raise StatusError("INVALID_ARGUMENT", f"'{name}' is required")
            return v
        if action not in ACTION_SYSCALLS:
            raise StatusError("NOT_FOUND", f"no console action '{action[:40]}'")
        if action != "rollback":             # a rollback names its owner and path: admitted below
            self.edge.admit(principal, syscall(ACTION_SYSCALLS[action]))
        if action == "cancel-request":
            await k.generate.cancel(principal, arg("request_id"))
            return {"cancelled": body["request_id"]}
        if action in ("confirm", "deny"):
            if not principal.operator:
                raise StatusError("PERMISSION_DENIED", "only operators confirm or deny tool calls")
            if action == "confirm":
                call = await k.tools.confirm(arg("call_id"))
            else:
                call = k.tools.deny(arg("call_id"), f"denied by {principal.agent_id} in the console")
            return {"call_id": call.call_id, "state": call.state}
        if action == "cancel-job":
            job = await k.tuner.cancel(principal, arg("job_id"))
            return {"job_id": job.job_id, "state": job.state}
        if action == "rollback":
            agent = self.subject_id(principal, body.get("agent") or "")
            path = arg("path")
            version = body.get("version")
            if not isinstance(version, int) or version < 1:
                raise StatusError("INVALID_ARGUMENT", "'version' must be a positive integer")
            owner = "" if agent == principal.agent_id else agent
            self.edge.admit(principal, syscall(ACTION_SYSCALLS[action], owner=owner, path=path))
            f = await k.storage.rollback(principal, path, version, owner)
            return {"path": f.path, "version": f.version}
        raise StatusError("NOT_FOUND", f"no console action '{action[:40]}'")
