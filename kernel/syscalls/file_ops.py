"""File operations an agent asks for in words (AIOS's `operate_file` and storage queries): the model turns the
request into operations (write, create_file, create_dir, rollback, share, retrieve), constrained to those tools;
each is admitted as the syscall it is (`storage.write`, `access.grant`, ...) and run by the files use case.

`generate(principal, Generation) -> Reply` and `admit(principal, syscall, path, args)` are handed in by the
transport, so that the generation and each operation pass its edge (admission, audit, trace)."""
from __future__ import annotations

import json
from dataclasses import replace

from kernos.abi.errors import StatusError

from .generation import Generation, Reply


def _tool(name: str, description: str, props: dict) -> dict:
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return {"name": name, "description": description, "parameters_json": json.dumps(schema)}


_PATH = {"type": "string", "description": "the file's path, e.g. notes/plan.txt"}
# the storage operations the model may pick (AIOS's own set)
FILE_TOOLS = [_tool("write", "Write text into a file (a new version).",
                    {"file_path": _PATH, "content": {"type": "string"}}),
              _tool("create_file", "Create an empty file.", {"file_path": _PATH}),
              _tool("create_dir", "Create a directory.", {"dir_path": {"type": "string"}}),
              _tool("rollback", "Restore a file as it was n versions ago.",
                    {"file_path": _PATH, "n": {"type": "integer", "minimum": 1}}),
              _tool("share", "Share a file with the other AIOS agents.", {"file_path": _PATH}),
              _tool("retrieve", "Find files by meaning.", {"query_text": {"type": "string"}})]
SYSTEM = "You turn the user's request into file operations. Call the operations that do what the user asks."


def param(params: dict, key: str, kind=str, required: bool = True, default=None):
    """`params[key]` checked: a non-empty string, or an integer in [0, 2^31); INVALID_ARGUMENT naming it."""
    v = params.get(key, default)
    if v is None and not required:
        return default
    if kind is int and isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if (not isinstance(v, kind) or (kind is str and required and not v.strip()) or isinstance(v, bool) and kind is int
            or kind is int and not 0 <= v < (1 << 31)):
        what = "a non-empty string" if kind is str else "an integer from 0 to 2^31-1"
        raise StatusError("INVALID_ARGUMENT", f"query_data.params.{key} must be {what}")
    return v


def calls(reply: Reply) -> list[dict]:
    """The reply's tool calls as {"id", "name", "parameters"}."""
    out = []
    for c in reply.tool_calls:
        try:
            args = json.loads(c["arguments"] or "{}")
        except ValueError:
            args = {"_raw": c["arguments"]}
        out.append({"id": c["id"], "name": c["name"], "parameters": args})
    return out


class FileOperations:
    def __init__(self, files, access, share_group: str, generate, admit):
        self.files = files
        self.access = access
        self.share_group = share_group          # who "share" shares with: group:NAME
        self.generate = generate
        self.admit = admit

    async def operate(self, principal, g: Generation) -> tuple[Reply, list[str], list[str]]:
        """Let the model pick the operations for the request `g` and run them: (its reply, what was done,
        what failed)."""
        g = replace(g, messages=[{"role": "system", "content": SYSTEM}] + g.messages, tools=FILE_TOOLS,
                    tool_choice="required", parallel_tool_calls=True, response_format="")
        reply = await self.generate(principal, g)
        done, errors = [], []
        for c in calls(reply):
            try:
                done.append(await self.run(principal, c["name"], c["parameters"]))
            except StatusError as e:
                errors.append(f"{c['name']}: {e.message}")
        return reply, done, errors

    async def run(self, principal, op: str, p: dict) -> str:
        """One operation; what it did, in words."""
        files = self.files
        if op == "mount":
            return f"mounted the storage of agent '{principal.agent_id}' (each AIOS agent has its own)"
        if op == "create_dir":
            path = param(p, "dir_path")
            return f"directory '{path}' is ready (directories exist through the files in them)"
        if op in ("write", "create_file"):
            return await self._write(principal, op, p)
        if op == "rollback":
            path = param(p, "file_path")
            n = param(p, "n", int, required=False, default=1)
            self.admit(principal, "storage.rollback", path, {"file_path": path, "n": n})
            history = await files.history(principal, path)
            if n < 1 or n >= len(history):
                raise StatusError("OUT_OF_RANGE", f"'{path}' has {len(history)} versions: cannot go back {n}")
            target = history[-1 - n].version
            f = await files.rollback(principal, path, target)
            return f"rolled '{f.path}' back to version {target} (now version {f.version})"
        if op == "share":
            path = param(p, "file_path")
            self.admit(principal, "access.grant", "", {"file_path": path})
            await files.stat(principal, path)
            await self.access.grant(principal, f"group:{self.share_group}", "storage", principal.agent_id, path,
                                    "read", 0)
            return (f"shared '{path}' with every AIOS agent (read it as owner '{principal.agent_id}', "
                    f"path '{path}')")
        if op != "retrieve":
            raise StatusError("INVALID_ARGUMENT", f"unknown file operation '{op[:40]}'")
        query = param(p, "query_text")
        n = param(p, "n", int, required=False, default=5)
        self.admit(principal, "storage.search", "", {"query_text": query})
        hits = await files.search(principal, query, max(1, min(50, n)))
        return json.dumps([{"file_path": path, "version": version, "passage": passage, "distance": d}
                           for path, version, passage, d in hits])

    async def _write(self, principal, op: str, p: dict) -> str:
        files = self.files
        path = param(p, "file_path")
        content = param(p, "content", required=False, default="") if op == "write" else ""
        if not isinstance(content, str):
            raise StatusError("INVALID_ARGUMENT", "query_data.params.content must be a string")
        self.admit(principal, "storage.write", path, {"file_path": path})
        if op == "create_file":
            try:
                f = await files.stat(principal, path)
                if not f.deleted:
                    return f"file '{f.path}' already exists (version {f.version})"
            except StatusError as e:
                if e.code != "NOT_FOUND":
                    raise
        data = content.encode()
        # AIOS indexes what it writes, for retrieve; past storage.max_indexed_bytes the file is stored unindexed
        # (a 3.8 MB write spent 45 s embedding and then failed)
        index = bool(content.strip()) and len(data) <= files.max_indexed_bytes
        f = await files.write(principal, path, data, {"source": "aios"}, index)
        note = "" if index or not content.strip() else (
            f"; not indexed for retrieve: over {files.max_indexed_bytes} bytes (storage.max_indexed_bytes)")
        return f"wrote '{f.path}' (version {f.version}, {f.size} bytes{note})"
