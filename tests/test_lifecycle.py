"""Kernel process lifecycle: SIGTERM drains in-flight generations and exits 0; a restart keeps
registrations and traces; a bad config fails at start naming the field."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import write_config

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel


def test_sigterm_drains_then_restart_keeps_state(tiny_models, tmp_path):
    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny", "path": str(tiny_models["jamba"])}],
                       server={"drain_timeout_s": 60})
    data = tmp_path / "data"
    proc, address = start_kernel(data, str(cfg), timeout=120)
    try:
        s = kernos.sdk.connect(address, agent="survivor")
        result = {}

        def long_call():
            try:
                result["reply"] = s.llm.chat("hello world", max_tokens=200, stop=["never-appears-xyz"])
            except Exception as e:  # recorded for the assertion below
                result["error"] = e
        t = threading.Thread(target=long_call)
        t.start()
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until the generation is running
            m = s.kernel.stats().models[0]
            if m.running == 1:
                break
            time.sleep(0.01)
        assert m.running == 1
        code = stop_kernel(proc, timeout=90)
        t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert "error" not in result, result.get("error")
    assert result["reply"].completion_tokens == 200 and result["reply"].finish_reason == "length"

    proc, address = start_kernel(data, str(cfg), timeout=120)
    try:
        again = kernos.sdk.connect(address, agent="survivor", token=s.token)  # the token survived the restart
        me = {a.agent_id: a for a in again.kernel.agents()}["survivor"]
        assert me.completion_tokens >= 200
        from kernos.storage.traces import TraceLog
        log = TraceLog.__new__(TraceLog)
        log.path = data / "traces.db"
        assert any(r.response.get("usage", {}).get("completion_tokens") == 200
                   for r in log.query(agent_id="survivor", kind="llm.generate"))
        again.exit()
    finally:
        assert stop_kernel(proc) == 0


def test_draining_kernel_refuses_new_work(tiny_models, tmp_path):
    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny", "path": str(tiny_models["llama"])}],
                       server={"drain_timeout_s": 60}, engine={"max_batch_size": 1})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        a = kernos.sdk.connect(address, agent="a")
        b = kernos.sdk.connect(address, agent="b")
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", a.llm.chat("x", max_tokens=256,
                                                                               stop=["never-appears-xyz"])))
        t.start()
        while a.kernel.stats().models[0].running == 0:
            time.sleep(0.01)
        import signal
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises((kernos.sdk.Unavailable, kernos.sdk.KernosError)):
            b.llm.chat("late", max_tokens=4)
        t.join(60)
        assert done["r"].completion_tokens == 256
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_config_fails_at_start_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[engine]\nmax_batch_size = 0\n")
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "serve", "--config", str(cfg), "--data-dir",
                          str(tmp_path / "d"), "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "engine.max_batch_size" in out.stderr


def test_missing_model_folder_fails_at_start(tmp_path):
    cfg = write_config(tmp_path / "k.toml", [{"name": "ghost", "path": str(tmp_path / "nowhere")}])
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "serve", "--config", str(cfg), "--data-dir",
                          str(tmp_path / "d"), "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "ghost" in out.stderr and "config.json" in out.stderr


def test_snapshot_survives_a_restart_and_resumes_exactly(tiny_models, tmp_path):
    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny", "path": str(tiny_models["jamba"])}])
    data = tmp_path / "data"
    kw = dict(max_tokens=200, temperature=0.9, top_k=50, seed=5, stop=["never-appears-xyz"])
    proc, address = start_kernel(data, str(cfg), timeout=120)
    try:
        s = kernos.sdk.connect(address, agent="snapper")
        reference = s.llm.chat("the agent kernel", **kw)
        stream = s.llm.stream("the agent kernel", **kw)
        rid = next(stream).request_id
        next(c for c in stream if c.text)  # it is generating
        snapshot_id = s.llm.snapshot(rid)
        last = list(stream)[-1]
        assert last.done and last.completion.finish_reason == "snapshot"
        assert last.completion.snapshot_id == snapshot_id
        assert 0 < last.completion.completion_tokens < reference.completion_tokens
        with kernos.sdk.connect(address, agent="thief") as other:
            with pytest.raises(kernos.sdk.PermissionDenied):
                list(other.llm.restore(snapshot_id))
        with pytest.raises(kernos.sdk.InvalidArgument):
            list(s.llm.restore("../../etc/passwd"))
        assert stop_kernel(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, address = start_kernel(data, str(cfg), timeout=120)
    try:
        again = kernos.sdk.connect(address, agent="snapper", token=s.token)
        chunks = list(again.llm.restore(snapshot_id))
        final = chunks[-1].completion
        assert final.text == reference.text
        assert (final.completion_tokens, final.finish_reason) == (reference.completion_tokens, reference.finish_reason)
        # The stream carries only the new text (the snapshot's reply carried the rest).
        new_text = "".join(c.text for c in chunks)
        assert new_text and reference.text.endswith(new_text) and len(new_text) < len(reference.text)
        with pytest.raises(kernos.sdk.NotFound):  # consumed
            list(again.llm.restore(snapshot_id))
        again.exit()
    finally:
        assert stop_kernel(proc) == 0
