"""`kernos` command line: serve the kernel, run the demo, inspect a running kernel."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path


def _address(args) -> str:
    if getattr(args, "address", None):
        return args.address
    if os.environ.get("KERNOS_ADDRESS"):
        return os.environ["KERNOS_ADDRESS"]
    addr_file = Path(os.path.expanduser(args.data_dir or "~/.kernos")) / "kernel.addr"
    if addr_file.exists():
        return addr_file.read_text().strip()
    return "127.0.0.1:7070"


def cmd_serve(args) -> int:
    from ..config import ConfigError, load_config

    try:
        server = {k: v for k, v in (("listen", args.listen), ("http_listen", args.http)) if v is not None}
        config = load_config(args.config, server=server or None, data_dir=args.data_dir)
    except ConfigError as e:
        print(f"kernos serve: {e}", file=sys.stderr)
        return 2
    from ..daemon import run

    try:
        return run(config)
    except Exception as e:  # a model that cannot load, a data dir that cannot be written, ...
        logging.getLogger("kernos").error("kernos serve: %s", e)
        return 1


@contextlib.contextmanager
def _session(args):
    """A session as the principal of --token / KERNOS_TOKEN (an operator sees every agent's requests; an
    agent its own), kept registered on leave; without a token, a throwaway agent that exits on leave."""
    import kernos.sdk

    token = getattr(args, "token", None) or os.environ.get("KERNOS_TOKEN")
    s = kernos.sdk.connect(_address(args), agent=f"kernos-cli-{os.getpid()}", token=token, timeout=args.timeout,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    try:
        yield s
    finally:
        s.close() if token else s.exit()


def cmd_status(args) -> int:
    from google.protobuf.json_format import MessageToDict

    import kernos.sdk

    try:
        with _session(args) as s:
            st = s.kernel.stats()
    except kernos.sdk.KernosError as e:
        print(f"kernos status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2))
        return 0
    from .top import render

    print(render(st, detail=False))
    return 0


def cmd_top(args) -> int:
    import kernos.sdk

    from .top import top

    try:
        with _session(args) as s:
            top(s, args.interval, args.once, sys.stdout)
    except KeyboardInterrupt:
        pass
    except kernos.sdk.KernosError as e:
        print(f"kernos top: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_agents(args) -> int:
    import kernos.sdk

    try:
        with _session(args) as s:
            agents = s.kernel.agents(include_exited=args.all)
    except kernos.sdk.KernosError as e:
        print(f"kernos agents: {e}", file=sys.stderr)
        return 1
    me = f"kernos-cli-{os.getpid()}"
    print(f"{'agent':<28}{'state':<9}{'syscalls':>9}{'prompt tok':>11}{'gen tok':>9}")
    for a in agents:
        if a.agent_id != me:
            print(f"{a.agent_id:<28}{a.state:<9}{a.syscalls:>9}{a.prompt_tokens:>11}{a.completion_tokens:>9}")
    return 0


def cmd_token(args) -> int:
    """Create, revoke or list tokens offline, in the kernel's data dir (a running kernel sees the change at
    its next check): operator tokens (the default), enrollment tokens (--enroll) and agents' tokens (--agent)."""
    from kernos.abi.errors import StatusError

    from ..security.access import AccessControl
    from ..security.enrollment import Enrollments
    from ..security.principals import AgentRegistry

    data = Path(os.path.expanduser(args.data_dir or os.environ.get("KERNOS_DATA_DIR", "~/.kernos")))
    data.mkdir(parents=True, exist_ok=True)
    args.name = args.name or ("enroll" if args.enroll else "operator")
    ttl = f", expires in {args.ttl:.0f} s" if args.ttl else ""
    if args.action == "list":
        _list_tokens(data)
        return 0
    try:
        if args.agent:
            registry = AgentRegistry(data / "kernel.db", ttl_s=600)
            try:
                if args.action == "create":
                    known = registry.get(args.agent) is not None
                    _, token = (registry.rotate if known else registry.create)(args.agent, args.description)
                    print(token)
                    print(f"agent '{args.agent}' " + ("has a new token (the old one no longer works)" if known
                                                      else "created") + "; the token is shown only now",
                          file=sys.stderr)
                else:
                    if not registry.revoke(args.agent):
                        print(f"kernos token: no agent '{args.agent}' with an active token", file=sys.stderr)
                        return 1
                    print(f"agent '{args.agent}' token revoked; the name stays reserved (kernos token create "
                          f"--agent {args.agent} issues a new one)", file=sys.stderr)
            finally:
                registry.close(flush=False)    # the kernel's counters are its own
            return 0
        if args.enroll:
            en = Enrollments(data / "access.db")
            try:
                if args.action == "create":
                    token, e = en.create(args.name, uses=args.uses, ttl_s=args.ttl, group=args.group)
                    print(token)
                    print(f"enrollment token '{args.name}' created: {e.uses_left} registration(s)"
                          + (f" into group '{e.group}'" if e.group else "") + ttl + "; it is shown only now",
                          file=sys.stderr)
                else:
                    if not en.revoke(args.name):
                        print(f"kernos token: no active enrollment token '{args.name}'", file=sys.stderr)
                        return 1
                    print(f"enrollment token '{args.name}' revoked", file=sys.stderr)
            finally:
                en.close()
            return 0
        ac = AccessControl(data / "access.db")
        try:
            if args.action == "create":
                token, expires = ac.create_token(args.name, admin=True, ttl_s=args.ttl)
                print(token)
                print(f"operator token '{args.name}' created{ttl}; it is shown only now", file=sys.stderr)
            else:
                if not ac.revoke_token(args.name):
                    print(f"kernos token: no active token '{args.name}'", file=sys.stderr)
                    return 1
                print(f"operator token '{args.name}' revoked", file=sys.stderr)
        finally:
            ac.close()
    except StatusError as e:
        print(f"kernos token: {e.message}", file=sys.stderr)
        return 2
    return 0


def _expiry(expires: float) -> str:
    if not expires:
        return "active"
    left = expires - time.time()
    return f"expires in {left:.0f} s" if left > 0 else "expired"


def _list_tokens(data: Path) -> None:
    """Every token's name and state (never a token: only hashes are kept)."""
    from ..security.access import AccessControl
    from ..security.enrollment import Enrollments
    from ..security.principals import AgentRegistry

    ac = AccessControl(data / "access.db")
    for name, expires, revoked in ac.tokens():
        print(f"operator {name:<28}" + ("revoked" if revoked else _expiry(expires)))
    ac.close()
    en = Enrollments(data / "access.db")
    for e in en.list():
        state = "revoked" if e.revoked else "used up" if e.uses_left < 1 else _expiry(e.expires)
        print(f"enroll   {e.name:<28}{state:<20}{e.uses_left} left" + (f", group {e.group}" if e.group else ""))
    en.close()
    registry = AgentRegistry(data / "kernel.db", ttl_s=float("inf"))
    for a in registry.list(include_exited=True):
        print(f"agent    {a.agent_id:<28}{'active token' if a.token_hash else 'revoked'}")
    registry.close(flush=False)


def cmd_decide(args) -> int:
    """Confirm or deny a pending irreversible tool call, or list them (operators)."""
    import kernos.sdk

    token = args.token or os.environ.get("KERNOS_TOKEN")
    if not token:
        print("kernos: an operator token is needed: --token or KERNOS_TOKEN (kernos token create --admin)",
              file=sys.stderr)
        return 2
    try:
        s = kernos.sdk.connect(_address(args), token=token, timeout=args.timeout, tls_ca=args.tls_ca,
                               tls_cert=args.tls_cert, tls_key=args.tls_key)
        if args.command == "pending":
            for c in s.tools.pending():
                print(f"{c.call_id}  {c.tool}  by {c.agent_id}")
            return 0
        r = s.tools.confirm(args.call_id) if args.command == "confirm" else s.tools.deny(args.call_id)
    except kernos.sdk.KernosError as e:
        print(f"kernos {args.command}: {e}", file=sys.stderr)
        return 1
    print(f"{r.call_id}: {r.state}" + (f" ({r.error})" if r.error else f" -> {json.dumps(r.result)}"))
    return 0


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
        s = kernos.sdk.connect(_address(args), token=token, timeout=args.timeout, tls_ca=args.tls_ca,
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
                           set_default=args.set_default, min_improvement=args.min_improvement)
    print(f"job {job.job_id} queued: adapter '{job.name}' on '{job.model}' from data set '{job.dataset}'")
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


def cmd_mcp(args) -> int:
    from .mcp_stdio import run

    token = args.token or os.environ.get("KERNOS_TOKEN")
    if not token:
        print("kernos mcp: an agent's token is needed (--token or KERNOS_TOKEN)", file=sys.stderr)
        return 2
    if not args.stdio:
        print("kernos mcp: only --stdio is a local transport; HTTP clients use the kernel's /mcp directly",
              file=sys.stderr)
        return 2
    return run(args.url.rstrip("/") + ("" if args.url.rstrip("/").endswith("/mcp") else "/mcp"), token)


def cmd_demo(args) -> int:
    from kernos.agents.demo import run_demo

    return run_demo(data_dir=args.data_dir, max_tokens=args.max_tokens, config=args.config, linger_s=args.linger)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernos", description="Kernos: an operating-system kernel for LLM agents.")
    p.add_argument("--log-level", default=os.environ.get("KERNOS_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the kernel daemon (gRPC, and the OpenAI-compatible HTTP API)")
    s.add_argument("--config", help="TOML config file (every field has a default; KERNOS_* env vars override)")
    s.add_argument("--listen", help="host:port to listen on (default 127.0.0.1:7070; port 0 picks a free one)")
    s.add_argument("--http", help="host:port of the OpenAI-compatible HTTP API (default 127.0.0.1:7071; '' turns "
                                  "it off; port 0 picks a free one)")
    s.add_argument("--data-dir", help="agents, traces and converted models (default ~/.kernos)")
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="start a kernel on the embedded model and run example agents against it")
    d.add_argument("--data-dir", default=os.environ.get("KERNOS_DEMO_DATA_DIR", ".kernos-demo"),
                   help="kernel data dir for the demo (keeps the converted model; default .kernos-demo)")
    d.add_argument("--config", help="TOML config for the demo kernel (default: embedded model)")
    d.add_argument("--linger", type=float, default=float(os.environ.get("KERNOS_DEMO_LINGER_S", "0")),
                   metavar="SECONDS", help="keep the kernel (and its console) up this long after the agents finish; "
                                           "Ctrl-C stops it sooner (default 0)")
    d.add_argument("--max-tokens", type=int, default=64, help="max tokens per agent reply (default 64)")
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("mcp", help="serve Kernos to a local MCP client over stdio (relayed to the kernel's /mcp)")
    m.add_argument("--stdio", action="store_true", help="speak MCP on stdin/stdout")
    m.add_argument("--url", default=os.environ.get("KERNOS_HTTP", "http://127.0.0.1:7071"),
                   help="the kernel's HTTP address (default $KERNOS_HTTP or http://127.0.0.1:7071)")
    m.add_argument("--token", help="the agent's token (default $KERNOS_TOKEN)")
    m.set_defaults(fn=cmd_mcp)
    t = sub.add_parser("token", help="operator, enrollment and agent tokens in a kernel's data dir (offline; a "
                                     "running kernel sees them at once)")
    t.add_argument("action", choices=["create", "revoke", "list"])
    kind = t.add_mutually_exclusive_group()
    kind.add_argument("--admin", action="store_true", help="an operator token (the default kind)")
    kind.add_argument("--enroll", action="store_true",
                      help="an enrollment token: lets new agents register under registration.policy = 'enroll'")
    kind.add_argument("--agent", metavar="NAME", help="create agent NAME and print its token (or, if it exists, "
                                                       "give it a new token; revoke: end its token, keep the name)")
    t.add_argument("--name", default=None, help="token name (default: operator, or enroll for --enroll)")
    t.add_argument("--ttl", type=float, default=0, help="seconds until it expires (default: never)")
    t.add_argument("--uses", type=int, default=1, help="--enroll: how many agents it may register (default 1)")
    t.add_argument("--group", default="", help="--enroll: the group its agents join (quotas per group apply)")
    t.add_argument("--description", default="", help="--agent: the agent's description")
    t.add_argument("--data-dir", help="the kernel's data dir (default $KERNOS_DATA_DIR or ~/.kernos)")
    t.set_defaults(fn=cmd_token)

    for name, fn, helptext in (("status", cmd_status, "print a running kernel's stats"),
                               ("top", cmd_top, "live view: requests per agent, tokens/s, context switches, cache"),
                               ("agents", cmd_agents, "list the agents registered with a running kernel"),
                               ("confirm", cmd_decide, "run a pending irreversible tool call (operators)"),
                               ("deny", cmd_decide, "refuse a pending irreversible tool call (operators)"),
                               ("pending", cmd_decide, "list tool calls waiting for confirmation (operators)"),
                               ("finetune", cmd_finetune, "fine-tuning jobs: start, status, cancel; adapters")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--address", help="kernel address (default $KERNOS_ADDRESS, DATA_DIR/kernel.addr, "
                                         "or 127.0.0.1:7070)")
        c.add_argument("--data-dir", help="find the address in this kernel's data dir")
        c.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the kernel")
        c.add_argument("--tls-ca", help="CA certificate (PEM) of a TLS kernel")
        c.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
        c.add_argument("--tls-key", help="client key (PEM) for mTLS")
        if name in ("confirm", "deny"):
            c.add_argument("call_id", help="the pending call's id")
        if name == "finetune":
            c.add_argument("action", choices=["start", "status", "cancel", "adapters"],
                           help="start --name N --dataset D | status [JOB] | cancel JOB | adapters")
            c.add_argument("job_id", nargs="?", help="status/cancel: the job id")
            c.add_argument("--token", help="the agent's token (or an operator's: every agent's jobs); "
                                           "default $KERNOS_TOKEN")
            c.add_argument("--name", help="start: the adapter's name (served as AGENT:NAME)")
            c.add_argument("--dataset", help="start: a data set of the agent's (s.tuner.build_dataset)")
            c.add_argument("--model", help="start: the model to adapt (default: the kernel's default)")
            c.add_argument("--config", help="start: hyper-parameters, a JSON object or a JSON file "
                                            "(rank, alpha, learning_rate, epochs, max_steps, batch_size, ...)")
            c.add_argument("--set-default", action="store_true", help="start: once published, the agent's default")
            c.add_argument("--min-improvement", type=float, default=0.0,
                           help="start: publish only if the held-out loss falls by more than this fraction")
            c.add_argument("--wait", action="store_true", help="start: follow progress until the job ends")
            c.add_argument("--json", action="store_true", help="status: print JSON")
        if name in ("confirm", "deny", "pending"):
            c.add_argument("--token", help="operator token (default $KERNOS_TOKEN)")
        if name in ("status", "top", "agents"):
            c.add_argument("--token", help="look as this agent or operator (default $KERNOS_TOKEN); an agent sees "
                                           "its own requests and its groups' agents, an operator everything")
        if name == "status":
            c.add_argument("--json", action="store_true", help="print the raw stats as JSON")
        elif name == "top":
            c.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
            c.add_argument("--once", action="store_true", help="print one frame and exit")
        elif name == "agents":
            c.add_argument("--all", action="store_true", help="include exited and expired agents")
        c.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "finetune":
        if args.action in ("cancel",) and not args.job_id:
            parser.error("kernos finetune cancel needs a JOB_ID")
        if args.action == "start" and not (args.name and args.dataset):
            parser.error("kernos finetune start needs --name and --dataset")
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "urllib3", "transformers", "huggingface_hub", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
