"""An AIOS-style agent, written the way agents for AIOS's SDK (Cerebrum) are: every syscall is one `POST /query`
of `{"agent_name", "query_type", "query_data"}`, and the agent reads `result["response"][...]`. It runs unchanged
against a Kernos kernel with `server.aios_compat = true`:

    kernos serve --config kernos.toml          # [server] aios_compat = true
    python -m kernos.agents.aios_agent --url http://127.0.0.1:7071 "What is 17 * 23?"

It remembers the task, lets the model pick and run the calculator (`call_tool`), explains the result (`chat`),
files a report (`storage`), and recalls its earlier tasks (`memory`). Standard library only, as an AIOS agent
would be without Cerebrum installed."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request

# (The pattern keeps a small model's expression an expression: without it the 135M embedded model may write past
# the closing quote, "17 * 23}}</tool_call> ...", until max_new_tokens.)
CALCULATOR = {"name": "calculator", "description": "Evaluate an arithmetic expression such as 12 * (3 + 4).",
              "parameters": {"type": "object", "required": ["expression"],
                             "properties": {"expression": {"type": "string", "pattern": "^[0-9+*/(). -]{1,40}$"}}}}


class MathReporter:
    def __init__(self, agent_name: str = "example/math_reporter", base_url: str = "http://127.0.0.1:7071"):
        self.agent_name = agent_name
        self.base_url = base_url.rstrip("/")

    def send(self, query_type: str, query_data: dict) -> dict:
        """Cerebrum's send_request: the query, as the agent's; the reply's `response`."""
        body = json.dumps({"agent_name": self.agent_name, "query_type": query_type,
                           "query_data": query_data}).encode()
        request = urllib.request.Request(f"{self.base_url}/query", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:          # raises for 4xx/5xx, as Cerebrum does
            return json.loads(r.read())["response"]

    def llm(self, messages, action_type: str = "chat", tools=None, max_new_tokens: int = 64) -> dict:
        return self.send("llm", {"llms": None, "messages": messages, "tools": tools, "action_type": action_type,
                                 "temperature": 0.0, "max_new_tokens": max_new_tokens,
                                 "message_return_type": "text", "response_format": None})

    def run(self, task: str) -> dict:
        earlier = self.send("memory", {"operation_type": "retrieve_memory", "params": {"content": task, "k": 3}})
        self.send("memory", {"operation_type": "add_memory", "params": {"content": task,
                                                                        "metadata": {"kind": "task"}}})
        tool = self.llm([{"role": "user", "content": task}], "call_tool", [CALCULATOR], max_new_tokens=128)
        runs = [c for c in tool.get("tool_calls") or [] if c.get("state") == "done"]
        answer = runs[0]["result"] if runs else None
        explained = self.llm([{"role": "user", "content": f"{task} The calculator says {answer}. "
                                                          "Say the answer in one sentence."}])
        report = f"# {task}\n\ncalculator: {answer}\n\n{explained['response_message']}\n"
        filed = self.send("storage", {"operation_type": "write", "params": {"file_path": "reports/latest.md",
                                                                            "content": report}})
        return {"answer": answer, "tool_error": tool.get("error"), "explanation": explained["response_message"],
                "report": filed["response_message"],
                "earlier_tasks": [r["content"] for r in earlier["search_results"] or []]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="An AIOS-style agent run against a Kernos kernel (server.aios_compat)")
    ap.add_argument("task", nargs="?", default="What is 17 * 23?")
    ap.add_argument("--url", default="http://127.0.0.1:7071", help="the kernel's HTTP address")
    ap.add_argument("--agent-name", default="example/math_reporter")
    args = ap.parse_args(argv)
    print(json.dumps(MathReporter(args.agent_name, args.url).run(args.task), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
