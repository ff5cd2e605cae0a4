"""`kernos node`: a cluster's nodes, read and changed in the cluster's database (offline, like `kernos token`):
list them with their leases; drain one (it takes no new agents: their homes move to the other nodes at their
next heartbeat) or put it back."""
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
