"""`kernos` command line: serve the kernel, run the demo, inspect a running kernel (through the SDK); tokens
offline (`tokens.py`); fine-tuning jobs (`finetune.py`)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from .address import address as _address
from .finetune import cmd_finetune
from .nodes import cmd_migrate, cmd_node
from .tokens import cmd_token


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

    import kernos.sdk

    try:
        with _session(args) as s:
            st = s.kernel.stats()
    except kernos.sdk.KernosError as e:
        print(f"kernos status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(kernos.sdk.to_dict(st), indent=2))
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

    nd = sub.add_parser("node", help="a cluster's nodes (in its database): list, drain NODE, undrain NODE, "
                                     "move --agent A NODE")
    nd.add_argument("action", choices=["list", "drain", "undrain", "move"])
    nd.add_argument("node", nargs="?", help="drain/undrain/move: the node's id (kernos node list shows them)")
    nd.add_argument("--agent", help="move: the agent whose home becomes NODE")
    nd.add_argument("--unpin", action="store_true", help="move: give the agent back to the cluster's choice")
    nd.add_argument("--database", help="the cluster's PostgreSQL URL (default $KERNOS_CLUSTER__DATABASE, or "
                                       "--config's cluster.database)")
    nd.add_argument("--config", help="a kernel config file whose [cluster] database to use")
    nd.add_argument("--lease", type=float, default=10.0, help="list: seconds of lease (cluster.lease_s)")
    nd.set_defaults(fn=cmd_node)

    mg = sub.add_parser("migrate", help="copy a single kernel's data dir into the cluster backends a config names "
                                        "(PostgreSQL, S3, a Chroma server); run it with that kernel stopped")
    mg.add_argument("--config", required=True, help="the cluster's kernel config ([cluster], memory.chroma_url)")
    mg.add_argument("--data-dir", help="the single kernel's data dir (default: the config's data_dir)")
    mg.set_defaults(fn=cmd_migrate)

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
            c.add_argument("action", choices=["start", "status", "cancel", "adapters", "continual"],
                           help="start --name N --dataset D | status [JOB] | cancel JOB | adapters | continual "
                                "(the agent's continual tuning: phase, round, canary, history)")
            c.add_argument("job_id", nargs="?", help="status/cancel: the job id")
            c.add_argument("--token", help="the agent's token (or an operator's: every agent's jobs); "
                                           "default $KERNOS_TOKEN")
            c.add_argument("--name", help="start: the adapter's name (served as AGENT:NAME)")
            c.add_argument("--dataset", help="start: a data set of the agent's (s.tuner.build_dataset)")
            c.add_argument("--model", help="start: the model to adapt (default: the kernel's default)")
            c.add_argument("--config", help="start: hyper-parameters, a JSON object or a JSON file "
                                            "(rank, alpha, learning_rate, epochs, max_steps, batch_size, ...)")
            c.add_argument("--method", choices=["sft", "dpo", "kto", "grpo"],
                           help="start: the training method (default: the data set's kind for dpo, kto and grpo "
                                "data sets, else sft)")
            c.add_argument("--start-from", metavar="ADAPTER",
                           help="start: continue from 'current' (the agent's default adapter) or one of its adapters "
                                "by name, instead of the base model")
            c.add_argument("--set-default", action="store_true", help="start: once published, the agent's default")
            c.add_argument("--min-improvement", type=float, default=0.0,
                           help="start: publish only if the held-out loss falls by more than this fraction")
            c.add_argument("--wait", action="store_true", help="start: follow progress until the job ends")
            c.add_argument("--json", action="store_true", help="status, continual: print JSON")
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
