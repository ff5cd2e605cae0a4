"""House rules that are checkable: the SDK stays thin, generated code is fresh, the scheduler is pure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.strip().split(","))


def test_sdk_import_pulls_in_no_heavy_modules():
    mods = _imports_after("import kernos.sdk, kernos.sdk.aio")
    assert not {"torch", "transformers", "chromadb", "peft"} & mods


def test_scheduler_imports_no_torch():
    assert "torch" not in _imports_after("import kernos.scheduler")


def test_generated_grpc_modules_are_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for cmd in ("serve", "demo", "status", "top", "agents"):
        assert cmd in out.stdout


def _import_graph() -> dict[str, set[str]]:
    """Module -> the Kernos modules it imports (at the top or inside functions), from the sources."""
    import ast

    folders = {"abi": "kernos.abi", "kernel": "kernos.kernel", "scheduler": "kernos.scheduler",
               "memory": "kernos.memory", "storage": "kernos.storage", "sdk": "kernos.sdk", "agents": "kernos.agents"}
    mods = {}
    for folder, pkg in folders.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = (f, f.name == "__init__.py")
    graph = {}
    for name, (f, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import mod` needs pkg.mod; `from mod import name` needs mod
                found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = found or [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 100
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_protobuf_and_grpc_method_names_stay_in_the_grpc_adapter():
    """Only `kernel/api/grpc/` speaks protobuf in the kernel (the CLI reaches the kernel through the SDK);
    security and the HTTP surfaces decide and trace on typed syscalls."""
    offenders = []
    for f in (ROOT / "kernel").rglob("*.py"):
        rel = f.relative_to(ROOT / "kernel").as_posix()
        if rel.startswith("api/grpc/"):
            continue
        text = f.read_text()
        if any(x in text for x in ("kernos.proto", "google.protobuf", "/kernos.v1.", "SimpleNamespace")):
            offenders.append(rel)
    assert not offenders, offenders


def test_layers_import_only_what_they_may():
    """docs/architecture.md's table: the vocabulary imports nothing of Kernos; the scheduler and the LLM layer
    only what is below them; nothing below the transports imports them."""
    graph = _import_graph()
    may = {"kernos.abi": ("kernos.abi",),
           "kernos.scheduler": ("kernos.abi", "kernos.scheduler"),
           "kernos.storage": ("kernos.abi", "kernos.storage"),
           "kernos.kernel.llm": ("kernos.abi", "kernos.scheduler", "kernos.kernel.llm")}
    below_api = ("kernos.kernel.syscalls", "kernos.kernel.security", "kernos.kernel.tools", "kernos.kernel.tuner",
                 "kernos.kernel.llm", "kernos.kernel.app", "kernos.memory", "kernos.storage", "kernos.scheduler")
    wrong = []
    for mod, deps in graph.items():
        for layer, allowed in may.items():
            if mod == layer or mod.startswith(layer + "."):
                wrong += [f"{mod} -> {d}" for d in deps if d.startswith("kernos.") and not d.startswith(allowed)]
        if mod.startswith(below_api):
            wrong += [f"{mod} -> {d}" for d in deps if d.startswith(("kernos.kernel.api", "kernos.kernel.daemon"))]
    assert not wrong, "\n".join(wrong)
