"""The operator console (issue 18) in a real browser: headless Chromium (Debian's `chromium`, which `make test`
installs) driven by Playwright, against a real kernel process. Log-in with an operator token (a wrong one
refused, the session in an HttpOnly cookie, CSRF enforced), a running generation seen live and then
finished, an operator's cancel ending an agent's stream, a pending irreversible tool call confirmed in the
page returning the agent's `wait`, a fine-tune job's loss chart gaining points while it trains, a file diff
and rollback, and an agent's token seeing only its own pages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

ADMIN = "console-admin-token-0123456789"
CHROMIUM = os.environ.get("KERNOS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `make test` installs Debian's chromium "
                                                          "(apt-get install chromium), or set KERNOS_CHROMIUM")


@pytest.fixture(scope="module")
def ck(tiny_models, tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("console")
    cfg = write_config(d / "k.toml", [{"name": "tiny-llama", "path": str(tiny_models["llama"])},
                                      {"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN}, tools={"confirm_timeout_s": 120}, tuner={"threads": 1})
    proc, address = start_kernel(d / "data", str(cfg), timeout=120)
    yield address, f"http://{proc.http_address}", d / "data"
    assert stop_kernel(proc) == 0


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def login(browser, base: str, token: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{base}/console")
    assert page.url.endswith("/console/login")
    page.fill("#token", token)
    page.click("#login-submit")
    page.wait_for_url(f"{base}/console")
    page.errors = errors
    return page


def until(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = condition()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_login_refuses_a_wrong_token_and_keeps_the_token_out_of_reach(ck, browser):
    address, base, _ = ck
    page = browser.new_page()
    page.goto(f"{base}/console")
    page.fill("#token", "not-a-token-at-all-0000000000")
    page.click("#login-submit")
    page.wait_for_url("**/console/login?error=refused")
    assert "refused" in page.text_content("#login-error")
    page.goto(f"{base}/console")                          # still logged out
    assert page.url.endswith("/console/login")
    with pytest.raises(urllib.error.HTTPError) as e:      # the data API needs a session
        urllib.request.urlopen(f"{base}/console/api/page/overview", timeout=10)
    assert e.value.code == 401

    page = login(browser, base, ADMIN)
    page.wait_for_selector("section.model[data-model='tiny-llama']")
    assert page.text_content("#whoami").startswith("admin:")
    assert page.evaluate("document.cookie") == ""          # HttpOnly: scripts never see the session
    cookie = next(c for c in page.context.cookies() if c["name"] == "kernos_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN not in cookie["value"]
    # An action without the page's CSRF token is refused, even with the session cookie.
    r = page.request.post(f"{base}/console/api/action/deny", data=json.dumps({"call_id": "x"}),
                          headers={"Content-Type": "application/json"})
    assert r.status == 403 and "CSRF" in r.json()["error"]["message"]
    # The overview's charts fill with one point a second.
    n0 = int(page.get_attribute("section.model[data-model='tiny-llama'] .chart[data-chart='tokens/s']",
                                "data-points"))
    until(lambda: int(page.get_attribute("section.model[data-model='tiny-llama'] .chart[data-chart='tokens/s']",
                                         "data-points")) >= n0 + 2, 15, "new chart points")
    page.click("#logout")
    page.wait_for_url("**/console/login")
    page.goto(f"{base}/console")
    assert page.url.endswith("/console/login")
    with kernos.sdk.connect(address, token=ADMIN) as admin:
            records = [r for r in admin.access.audit(limit=1000) if r["method"] == "console.login"]
    assert {r["decision"] for r in records} == {"allow", "deny"}
    assert not page.errors


def test_a_generation_appears_live_finishes_and_an_operator_cancels_one(ck, browser):
    address, base, _ = ck
    page = login(browser, base, ADMIN)
    page.click("#nav a[data-page='requests']")
    with kernos.sdk.connect(address, agent="writer") as s:
        stream = s.llm.stream("a long story", model="tiny-llama", max_tokens=200, stop=["never-appears-xyz"])
        rid = next(stream).request_id
        s.llm.suspend(rid)                      # parked: it stays in the live table until resumed
        row = f"#live-requests tr[data-request-id='{rid}']"
        page.wait_for_selector(f"{row}[data-state='suspended']", timeout=15000)
        assert page.text_content(f"{row} td:nth-child(2)") == "writer"
        s.llm.resume(rid)
        chunks = list(stream)
        assert chunks[-1].done and chunks[-1].completion.completion_tokens == 200
        page.wait_for_selector(f"#recent-requests tr[data-request-id='{rid}'][data-finish='length']", timeout=15000)
        page.wait_for_selector(row, state="detached", timeout=15000)

        # An operator cancels a generation: the agent's stream ends with what it had, finish "cancelled".
        stream = s.llm.stream("another story", model="tiny-llama", max_tokens=200, stop=["never-appears-xyz"])
        rid = next(stream).request_id
        s.llm.suspend(rid)
        done: list = []
        reader = threading.Thread(target=lambda: done.extend(stream), daemon=True)
        reader.start()
        page.click(f"#live-requests tr[data-request-id='{rid}'] button[data-action='cancel']")
        reader.join(30)
        assert done and done[-1].done and done[-1].completion.finish_reason == "cancelled"
        page.wait_for_selector(f"#recent-requests tr[data-request-id='{rid}'][data-finish='cancelled']",
                               timeout=15000)
    assert not page.errors


def test_an_operator_confirms_a_pending_tool_call_in_the_page(ck, browser):
    address, base, _ = ck
    admin = kernos.sdk.connect(address, token=ADMIN)
    admin.tools.register("wire_money", "result = {'sent': args['amount']}",
                         {"type": "object", "properties": {"amount": {"type": "number"}}}, irreversible=True)
    page = login(browser, base, ADMIN)
    page.click("#nav a[data-page='tools']")
    with kernos.sdk.connect(address, agent="payer") as s:
        first, second = s.tools.call("wire_money", amount=12), s.tools.call("wire_money", amount=99)
        assert first.state == second.state == "pending"
        waited: list = []
        waiter = threading.Thread(target=lambda: waited.append(s.tools.wait(first.call_id, timeout=60)), daemon=True)
        waiter.start()
        page.click(f"#pending-calls tr[data-call='{first.call_id}'] button[data-action='confirm']")
        waiter.join(60)
        assert waited and waited[0].state == "done" and waited[0].result == {"sent": 12}, \
            (waited, page.text_content("#message"))
        page.click(f"#pending-calls tr[data-call='{second.call_id}'] button[data-action='deny']")
        assert s.tools.wait(second.call_id, timeout=30).state == "denied"
        page.wait_for_selector(f"#call-log tr[data-call='{first.call_id}'][data-state='done']", timeout=10000)
        page.wait_for_selector(f"#call-log tr[data-call='{second.call_id}'][data-state='denied']", timeout=10000)
        assert page.query_selector("#pending-calls tr[data-call]") is None
    assert not page.errors


def test_a_fine_tune_jobs_loss_chart_gains_points(ck, browser):
    from test_finetune import task

    address, base, _ = ck
    page = login(browser, base, ADMIN)
    page.click("#nav a[data-page='tuning']")
    with kernos.sdk.connect(address, agent="learner") as s:
        for q, right in task(32):
            r = s.llm.chat(q, model="tiny-llama", max_tokens=4)
            s.tuner.feedback(r.request_id, reward=0.0, preferred=right)
        s.tuner.build_dataset("colours", eval_fraction=0.25)
        job = s.tuner.finetune("colours", "colours", model="tiny-llama",
                               config={"learning_rate": 3e-3, "epochs": 60, "batch_size": 4, "checkpoint_every": 1000})
        chart = f".job[data-job='{job.job_id}'] .chart"
        seen = [int(page.get_attribute(chart, "data-points"))
                for _ in [page.wait_for_selector(chart, timeout=30000)]]
        while True:                      # sample the chart as the job runs: it must grow while running
            job = s.tuner.job(job.job_id)
            seen.append(int(page.get_attribute(chart, "data-points")))
            if job.done:
                break
            time.sleep(0.3)
        growing = sorted(set(seen))
        assert len(growing) >= 3 and growing == sorted(growing), seen
        page.wait_for_selector(f".job[data-job='{job.job_id}'][data-state='{job.state}']", timeout=15000)
        final = int(page.get_attribute(chart, "data-points"))
        assert final == job.step, (final, job.step)         # one point per step (at most 2000 are kept)
        text = page.text_content(f".job[data-job='{job.job_id}']")
        assert "base: loss" in text and "tuned: loss" in text
        s.tuner.continual(enabled=False, min_feedback=500)        # the page lists the agent's continual tuning
        row = page.wait_for_selector("#continual-table tr[data-agent='learner'][data-phase='idle']", timeout=15000)
        assert "off" in row.text_content() and "disabled" in row.text_content()
    assert not page.errors


def test_files_diff_and_rollback_and_memory_search(ck, browser):
    address, base, _ = ck
    with kernos.sdk.connect(address, agent="notes") as s:
        s.storage.write("plan.txt", b"one\ntwo\nthree\n")
        s.storage.write("plan.txt", b"one\n2\nthree\nfour\n")
        s.memory.add(["the launch is on tuesday", "lunch is pizza"])
        page = login(browser, base, ADMIN)
        page.goto(f"{base}/console#files?agent=notes&path=plan.txt&a=1&b=2")
        page.wait_for_selector("#diff")
        diff = page.text_content("#diff")
        assert "-two" in diff and "+2" in diff and "+four" in diff
        page.click("#history-table tr[data-version='1'] button[data-action='rollback']")
        page.wait_for_selector("#history-table tr[data-version='3']")
        assert s.storage.read("plan.txt") == b"one\ntwo\nthree\n"
        s.memory.create_context("chat", budget_tokens=400, system="You are terse.", model="tiny-llama")
        s.llm.chat("first question", context_id="chat", max_tokens=5)
        page.goto(f"{base}/console#contexts?agent=notes")
        page.wait_for_selector(".context[data-context='chat'] .block")
        blocks = page.query_selector_all(".context[data-context='chat'] .block")
        assert len(blocks) == 3                           # the system block, the question, the reply
        counts = [int(b.get_attribute("data-tokens")) for b in blocks]
        _, total = s.memory.blocks("chat")
        assert all(c > 0 for c in counts) and sum(counts) == total
        assert f"{total} of 400 tokens" in page.text_content(".context[data-context='chat'] h2")
        page.goto(f"{base}/console#memory?agent=notes")
        page.fill("#memory-query", "when is the launch")
        page.click("#memory-search")
        page.wait_for_selector("#memory-results tbody tr")
        assert "tuesday" in page.text_content("#memory-results tbody tr:first-child")
    assert not page.errors


def test_an_agents_token_sees_only_that_agents_pages(ck, browser):
    address, base, data = ck
    with kernos.sdk.connect(address, agent="nosy") as s, kernos.sdk.connect(address, agent="bystander") as other:
        other.storage.write("secret.txt", b"s3cret")
        other.tools.call("calculator", expression="6*7")
        page = login(browser, base, s.token)
        assert page.query_selector("#nav a[data-page='audit']") is None
        s.tools.call("calculator", expression="1+1")
        page.click("#nav a[data-page='tools']")
        page.wait_for_selector("#call-log tr[data-call]")
        agents = {page.text_content(f"#call-log tr[data-call]:nth-child({i + 1}) td:nth-child(3)")
                  for i in range(len(page.query_selector_all("#call-log tr[data-call]")))}
        assert agents == {"nosy"}
        page.click("#nav a[data-page='agents']")
        page.wait_for_selector("#agents-table tr[data-agent='nosy']")
        assert page.query_selector("#agents-table tr[data-agent='bystander']") is None
        for path in ("page/audit", "page/files?agent=bystander", "page/contexts?agent=bystander",
                     "page/memory?agent=bystander&q=x"):
            r = page.request.get(f"{base}/console/api/{path}")
            assert r.status == 403, (path, r.status)
        csrf = page.get_attribute("meta[name='csrf']", "content")
        r = page.request.post(f"{base}/console/api/action/rollback", headers={"X-Kernos-CSRF": csrf,
                              "Content-Type": "application/json"},
                              data=json.dumps({"agent": "bystander", "path": "secret.txt", "version": 1}))
        assert r.status == 403
        assert not page.errors
    # Revoking the agent's token ends its console session at once (exiting the SDK session did not).
    assert page.request.get(f"{base}/console/api/page/tools").status == 200
    out = subprocess.run([sys.executable, "-m", "kernos.kernel.cli", "token", "revoke", "--agent", "nosy",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert page.request.get(f"{base}/console/api/page/tools").status == 401
    page.goto(f"{base}/console")
    assert page.url.endswith("/console/login")


def test_the_overview_shows_the_cluster_and_a_drain(browser, tmp_path, pg_url, s3_url, s3_endpoint):
    from conftest import write_config

    from kernos.kernel.cluster.nodes import Nodes
    from kernos.storage.db import Postgres

    cfg = write_config(tmp_path / "c.toml", [{"name": "echo", "path": "-", "kind": "echo"}],
                       server={"admin_token": ADMIN},
                       cluster={"database": pg_url, "objects": s3_url, "s3_endpoint": s3_endpoint,
                                "heartbeat_s": 0.5, "lease_s": 3.0})
    procs = [start_kernel(tmp_path / f"n{i}", str(cfg), timeout=120) for i in range(2)]
    try:
        with kernos.sdk.connect(procs[0][1], token=ADMIN) as op:
            me = until(lambda: (st := op.kernel.stats()).node_id and len(st.nodes) == 2 and st, what="two nodes")
        other = next(n.node_id for n in me.nodes if n.node_id != me.node_id)
        page = login(browser, f"http://{procs[0][0].http_address}", ADMIN)
        page.wait_for_selector(f"#cluster-table tr[data-node='{me.node_id}'][data-state='up']", timeout=15000)
        assert "echo" in page.text_content(f"#cluster-table tr[data-node='{other}']")
        nodes = Nodes(Postgres(pg_url, "kernos_cluster"), node_id="")
        nodes.set_state(other, "draining")
        nodes.close()
        page.wait_for_selector(f"#cluster-table tr[data-node='{other}'][data-state='draining']", timeout=15000)
        assert not page.errors
        page.close()
    finally:
        for p, _ in procs:
            stop_kernel(p)
