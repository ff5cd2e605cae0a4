"""`kernos token`: create, revoke or list tokens offline, in a kernel's data dir, through the security
package's API (`security/tokens.py`): operator tokens (the default), enrollment tokens (--enroll) and agents'
tokens (--agent)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def cmd_token(args) -> int:
    from kernos.abi.errors import StatusError

    from ..security.tokens import OfflineTokens

    tokens = OfflineTokens(Path(os.path.expanduser(args.data_dir or os.environ.get("KERNOS_DATA_DIR", "~/.kernos"))),
                           os.environ.get("KERNOS_CLUSTER__DATABASE", ""))
    args.name = args.name or ("enroll" if args.enroll else "operator")
    ttl = f", expires in {args.ttl:.0f} s" if args.ttl else ""
    try:
        if args.action == "list":
            for t in tokens.list():
                print(f"{t.kind:<9}{t.name:<28}" + (f"{t.state:<20}{t.detail}" if t.detail else t.state))
        elif args.agent and args.action == "create":
            token, known = tokens.issue_agent(args.agent, args.description)
            print(token)
            print(f"agent '{args.agent}' " + ("has a new token (the old one no longer works)" if known
                                              else "created") + "; the token is shown only now", file=sys.stderr)
        elif args.agent:
            if not tokens.revoke_agent(args.agent):
                print(f"kernos token: no agent '{args.agent}' with an active token", file=sys.stderr)
                return 1
            print(f"agent '{args.agent}' token revoked; the name stays reserved (kernos token create "
                  f"--agent {args.agent} issues a new one)", file=sys.stderr)
        elif args.enroll and args.action == "create":
            token, e = tokens.create_enrollment(args.name, uses=args.uses, ttl_s=args.ttl, group=args.group)
            print(token)
            print(f"enrollment token '{args.name}' created: {e.uses_left} registration(s)"
                  + (f" into group '{e.group}'" if e.group else "") + ttl + "; it is shown only now", file=sys.stderr)
        elif args.enroll:
            if not tokens.revoke_enrollment(args.name):
                print(f"kernos token: no active enrollment token '{args.name}'", file=sys.stderr)
                return 1
            print(f"enrollment token '{args.name}' revoked", file=sys.stderr)
        elif args.action == "create":
            token, _ = tokens.create_operator(args.name, args.ttl)
            print(token)
            print(f"operator token '{args.name}' created{ttl}; it is shown only now", file=sys.stderr)
        else:
            if not tokens.revoke_operator(args.name):
                print(f"kernos token: no active token '{args.name}'", file=sys.stderr)
                return 1
            print(f"operator token '{args.name}' revoked", file=sys.stderr)
    except StatusError as e:
        print(f"kernos token: {e.message}", file=sys.stderr)
        return 2
    return 0
