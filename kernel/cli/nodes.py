"""`kernos migrate`: a single kernel's data dir into a cluster's backends (`cluster/migrate.py`).

`kernos node`: a cluster's nodes, read and changed in the cluster's database (offline, like `kernos token`):
list them with their leases; drain one (it takes no new agents: their homes move to the other nodes at their
next heartbeat, and its running streams continue there) or put it back; move one agent to a node by hand."""
from __future__ import annotations

import os
import sys
import time


def cmd_node(args) -> int:
    from kernos.abi.errors import StatusError
    from kernos.storage.db import Postgres

    from ..cluster.nodes import Nodes

    url = args.database or os.environ.get("KERNOS_CLUSTER__DATABASE", "")
    if not url and args.config:
        from ..config import ConfigError, load_config

        try:
            url = load_config(args.config).cluster.database
        except ConfigError as e:
            print(f"kernos node: {e}", file=sys.stderr)
            return 2
    if not url:
        print("kernos node: no cluster database: pass --database, --config, or set KERNOS_CLUSTER__DATABASE",
              file=sys.stderr)
        return 2
    nodes = Nodes(Postgres(url, "kernos_cluster"), node_id="", lease_s=args.lease)
    try:
        if args.action == "list":
            now = time.time()
            print(f"{'node':<28}{'state':<10}{'alive':<7}{'beat s':>7}  {'grpc':<22}models")
            for n in nodes.all():
                print(f"{n.node_id[:27]:<28}{n.state:<10}{'yes' if n.alive(now, args.lease) else 'NO':<7}"
                      f"{now - n.heartbeat:>7.1f}  {n.grpc_address[:21]:<22}{','.join(n.models)}")
            return 0
        if args.action == "move":
            if not args.agent:
                print("kernos node move: --agent NAME, and the node (or --unpin)", file=sys.stderr)
                return 2
            nodes.pin(args.agent, None if args.unpin else args.node)
            print(f"agent {args.agent}: " + ("home is the cluster's choice again" if args.unpin else
                                             f"home is {args.node} (from the nodes' next heartbeat)"))
            return 0
        if not args.node:
            print(f"kernos node {args.action}: name the node", file=sys.stderr)
            return 2
        n = nodes.set_state(args.node, "draining" if args.action == "drain" else "up")
        print(f"node {n.node_id}: {n.state}" + (" (its agents move to the other nodes at their next heartbeat)"
                                                if n.state == "draining" else ""))
        return 0
    except StatusError as e:
        print(f"kernos node: {e.message}", file=sys.stderr)
        return 1
    finally:
        nodes.close()


def cmd_migrate(args) -> int:
    from pathlib import Path

    from ..cluster.migrate import migrate
    from ..config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"kernos migrate: {e}", file=sys.stderr)
        return 2
    data_dir = Path(os.path.expanduser(args.data_dir)) if args.data_dir else config.data_dir
    if not data_dir.is_dir():
        print(f"kernos migrate: no data dir {data_dir}", file=sys.stderr)
        return 2
    if (data_dir / "kernel.addr").exists():
        print(f"kernos migrate: a kernel seems to run on {data_dir} (kernel.addr exists): stop it first",
              file=sys.stderr)
        return 1
    print(f"migrating {data_dir} into {config.cluster.database.split('@')[-1]}"
          + (f", {config.cluster.objects}" if config.cluster.objects else "")
          + (f", {config.memory.chroma_url}" if config.memory.chroma_url else ""))
    try:
        report = migrate(data_dir, config)
    except ValueError as e:
        print(f"kernos migrate: {e}", file=sys.stderr)
        return 2
    print(f"done: {sum(report.rows.values())} rows in {len(report.rows)} tables, {report.blobs} blobs "
          f"({report.blob_bytes / 2**20:.1f} MiB), {sum(report.memories.values())} memories in "
          f"{len(report.memories)} collections; running it again copies only what is missing")
    return 0
