"""Screenshots of the operator console for the README (docs/console-*.png): a kernel on the embedded model with
the demo's agents running, a pending irreversible tool call, a versioned file, a context and a short
fine-tune job, photographed in headless Chromium.

    .venv/bin/python scripts/console_screenshots.py [--out docs] [--data-dir .kernos-demo]
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

import kernos.sdk
from kernos.agents.demo import _run_agent, start_kernel, stop_kernel
from kernos.agents.examples import ALL_AGENTS


def background_work(address: str, admin_token: str, stop: threading.Event) -> None:
    admin = kernos.sdk.connect(address, token=admin_token)
    admin.tools.register("send_invoice", "result = {'sent': args['customer']}",
                         {"type": "object", "properties": {"customer": {"type": "string"}}}, irreversible=True)
    with kernos.sdk.connect(address, agent=f"billing-{os.getpid()}") as s:
        s.tools.call("calculator", expression="1299 * 12")
        s.tools.call("send_invoice", customer="ACME")
        s.storage.write("notes/plan.md", "# Plan\n- draft the report\n- send it on Monday\n")
        s.storage.write("notes/plan.md", "# Plan\n- draft the report\n- review it with Ana\n- send it on Tuesday\n")
        s.memory.create_context("support", budget_tokens=512)
        s.memory.add_block("support", "You are a terse support agent.", role="system", pinned=True, label="persona")
        s.llm.chat("My invoice is wrong, what should I do?", context_id="support", max_tokens=32)
        s.llm.chat("It was sent on Monday.", context_id="support", max_tokens=32)
        while not stop.is_set():
            s.llm.chat("Summarize the plan in one line.", max_tokens=24)


def tune(address: str) -> None:
    with kernos.sdk.connect(address, agent=f"learner-{os.getpid()}") as s:
        for i in range(12):
            r = s.llm.chat(f"What is {i} plus {i}?", max_tokens=8)
            s.tuner.feedback(r.request_id, reward=0.0, preferred=f"{i} plus {i} is {2 * i}.")
        s.tuner.build_dataset("sums", eval_fraction=0.25)
        job = s.tuner.finetune("sums", "sums", config={"max_steps": 40, "batch_size": 2, "learning_rate": 1e-3})
        s.tuner.wait(job.job_id, timeout=900)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs")
    ap.add_argument("--data-dir", default=".kernos-demo")
    args = ap.parse_args()
    chromium = os.environ.get("KERNOS_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        print("no chromium: apt-get install chromium (or set KERNOS_CHROMIUM)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    proc, address = start_kernel(Path(args.data_dir).resolve(), None,
                                 extra_env={"KERNOS_SERVER__ADMIN_TOKEN": token})
    base = f"http://{proc.http_address}"
    stop = threading.Event()
    threads = [threading.Thread(target=background_work, args=(address, token, stop), daemon=True),
               threading.Thread(target=tune, args=(address,), daemon=True)]
    threads += [threading.Thread(target=_run_agent, args=(cls, address, 96), daemon=True) for cls in ALL_AGENTS]
    try:
        for t in threads:
            t.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base}/console")
            page.fill("#token", token)
            page.click("#login-submit")
            page.wait_for_url(f"{base}/console")

            def shot(name: str, hash_: str, wait: str, settle: float = 2.0) -> None:
                page.goto(f"{base}/console#{hash_}")
                page.wait_for_selector(wait, timeout=600_000)
                time.sleep(settle)
                page.screenshot(path=str(out / f"console-{name}.png"))     # the viewport: small files
                print("wrote", out / f"console-{name}.png", flush=True)

            shot("requests", "requests", "#live-requests tr[data-state]")
            time.sleep(30)                                  # let the overview's charts fill
            shot("overview", "overview", "section.model")
            shot("tools", "tools", "#pending-calls tr[data-call]")
            shot("agents", "agents", "#agents-table tr[data-agent]")
            billing = f"billing-{os.getpid()}"
            shot("files", f"files?agent={billing}&path=notes/plan.md&a=1&b=2", "#diff")
            shot("contexts", f"contexts?agent={billing}", ".context .block")
            shot("tuning", "tuning", ".job[data-state='published'], .job[data-state='rejected'], "
                                     ".job[data-state='failed']")
            shot("audit", "audit", "#audit-table tr[data-decision]")
            browser.close()
    finally:
        stop.set()
        threads[1].join(timeout=60)                         # the tuner's agent exits before the kernel stops
        stop_kernel(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
