"""Example agents. Each one is a short, different use of the kernel's syscalls: a multi-turn
conversation, a checked answer, a summary, a streamed reply, a kernel context with files, a tool-using
agent and a structured-output one. They run concurrently in `kernos demo`,
so their generations share the kernel's running batch."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import kernos.sdk


@dataclass
class Exchange:
    prompt: str
    reply: str
    completion_tokens: int
    prompt_tokens: int
    latency_s: float
    queue_wait_ms: float


@dataclass
class AgentRun:
    name: str
    exchanges: list[Exchange] = field(default_factory=list)
    verdict: str = ""
    wall_s: float = 0.0


class Agent:
    name = "agent"
    description = ""

    def __init__(self, max_tokens: int = 64):
        self.max_tokens = max_tokens

    def run(self, session: kernos.sdk.Session) -> AgentRun:
        out = AgentRun(self.name)
        t0 = time.perf_counter()
        self.steps(session, out)
        out.wall_s = time.perf_counter() - t0
        return out

    def ask(self, session, out: AgentRun, messages, shown: str, **kw) -> str:
        t0 = time.perf_counter()
        c = session.llm.chat(messages, max_tokens=kw.pop("max_tokens", self.max_tokens), **kw)
        out.exchanges.append(Exchange(shown, c.text.strip(), c.completion_tokens, c.prompt_tokens,
                                      time.perf_counter() - t0, c.queue_wait_ms))
        return c.text.strip()

    def steps(self, session, out: AgentRun) -> None:
        raise NotImplementedError


class TravelPlanner(Agent):
    """Two turns of one conversation: the second question relies on the first answer."""
    name = "travel-planner"
    description = "plans a short trip, then follows up on its own plan"

    def steps(self, session, out):
        history = [{"role": "system", "content": "You are a concise travel assistant."},
                   {"role": "user", "content": "Suggest three things to see in Paris in one day."}]
        first = self.ask(session, out, history, history[-1]["content"])
        history += [{"role": "assistant", "content": first},
                    {"role": "user", "content": "Which of those should I see first, and why?"}]
        self.ask(session, out, history, history[-1]["content"])


class FactChecker(Agent):
    """Asks questions with known answers and checks the replies."""
    name = "fact-checker"
    description = "asks questions with known answers and scores the model"
    QUESTIONS = [("What is the capital of France?", "paris"), ("What is the capital of Italy?", "rome"),
                 ("What is the capital of Japan?", "tokyo")]

    def steps(self, session, out):
        right = 0
        for q, answer in self.QUESTIONS:
            reply = self.ask(session, out, q, q, max_tokens=24)
            right += answer in reply.lower()
        out.verdict = f"{right}/{len(self.QUESTIONS)} answers contain the expected city"


class Summarizer(Agent):
    """Condenses a paragraph with a stop string ending the summary at the first newline."""
    name = "summarizer"
    description = "summarizes a paragraph in one sentence"
    TEXT = ("An operating system manages a computer's hardware and software resources. It schedules programs, "
            "isolates them from one another, gives them memory and files, and controls who may access what. "
            "An LLM agent kernel does the same for agents that share a language model.")

    def steps(self, session, out):
        prompt = f"Summarize this text in one sentence:\n\n{self.TEXT}"
        self.ask(session, out, prompt, "Summarize (one sentence): " + self.TEXT[:60] + "...", stop=["\n"])


class Poet(Agent):
    """Streams its reply chunk by chunk, measuring time to first chunk on the client side."""
    name = "poet"
    description = "streams a short poem"

    def steps(self, session, out):
        prompt = "Write a short poem about a computer that never sleeps."
        t0 = time.perf_counter()
        first = None
        text, final = [], None
        for chunk in session.llm.stream(prompt, max_tokens=self.max_tokens, temperature=0.7, seed=7):
            if first is None and chunk.text:
                first = time.perf_counter() - t0
            text.append(chunk.text)
            final = chunk.completion
        out.exchanges.append(Exchange(prompt, "".join(text).strip(), final.completion_tokens, final.prompt_tokens,
                                      time.perf_counter() - t0, final.queue_wait_ms))
        out.verdict = f"{len(text)} chunks streamed, first after {first * 1e3:.0f} ms" if first else "no text"


class Translator(Agent):
    """Several independent short requests in a row."""
    name = "translator"
    description = "translates short sentences to French"
    SENTENCES = ["Good morning.", "Thank you very much.", "Where is the train station?"]

    def steps(self, session, out):
        for s in self.SENTENCES:
            self.ask(session, out, [{"role": "system", "content": "Translate the user's sentence to French. "
                                                                  "Reply with the translation only."},
                                    {"role": "user", "content": s}], f"To French: {s}", max_tokens=24)


class Archivist(Agent):
    """Uses the OS services: a working context the kernel keeps, a versioned note written with semantic
    indexing, and a search over its own files by meaning."""
    name = "archivist"
    description = "keeps a conversation in a kernel context, files notes and finds them by meaning"

    def steps(self, session, out):
        ctx = f"archive-{session.agent_id}"
        session.memory.create_context(ctx, budget_tokens=512, system="You are a concise archivist.")
        first = self.ask(session, out, "Name one famous library in the world.", "Name one famous library.",
                         context_id=ctx, max_tokens=32)
        self.ask(session, out, "In which city is it?", "In which city is it? (the kernel supplies the history)",
                 context_id=ctx, max_tokens=24)
        session.storage.write("notes/library.md", first, index=True)
        session.storage.write("notes/groceries.md", "Milk, eggs, bread and coffee.", index=True)
        hit = session.storage.search("books and reading rooms", k=1)[0]
        blocks, tokens = session.memory.blocks(ctx)
        out.verdict = (f"context holds {len(blocks)} blocks ({tokens} tokens); search for 'books and reading "
                       f"rooms' found {hit.path} v{hit.version}")


class Calculator(Agent):
    """Tool use: the model must call the kernel's `calculator` tool (a forced, grammar-constrained call, so
    every call is valid for the tool's schema); the agent runs it through the tool syscall and hands the
    result back for the answer."""
    name = "calculator"
    description = "answers arithmetic by calling the kernel's calculator tool"
    QUESTIONS = [("What is 17 times 23?", 391), ("What is 1234 plus 4321?", 5555), ("What is 144 divided by 12?", 12)]

    def steps(self, session, out):
        tool = next(t for t in session.tools.list() if t["name"] == "calculator")
        spec = {"name": "calculator", "description": tool["description"], "parameters": tool["schema"]}
        valid = right = 0
        for question, expected in self.QUESTIONS:
            t0 = time.perf_counter()
            history = [{"role": "system", "content": "Use the calculator: write the expression with numbers and "
                                                     "+ - * / only, for example 6 * 7."},
                       {"role": "user", "content": question}]
            reply = session.llm.chat(history, tools=[spec], tool_choice="calculator", parallel_tool_calls=False,
                                     max_tokens=max(self.max_tokens, 96))
            call = reply.tool_calls[0] if reply.tool_calls else None
            if call is None:
                out.exchanges.append(Exchange(question, f"(no call: {reply.finish_reason})", reply.completion_tokens,
                                              reply.prompt_tokens, time.perf_counter() - t0, reply.queue_wait_ms))
                continue
            valid += 1
            try:
                result = session.tools.call("calculator", **call.args).result
            except kernos.sdk.KernosError as e:
                result = f"error: {e.message}"
            right += result == expected
            history += [reply.message(), {"role": "tool", "content": str(result), "tool_call_id": call.id}]
            answer = session.llm.chat(history, max_tokens=24)
            out.exchanges.append(Exchange(question, f"calculator({call.arguments}) = {result}; "
                                          f"{answer.text.strip()}", reply.completion_tokens + answer.completion_tokens,
                                          reply.prompt_tokens, time.perf_counter() - t0, reply.queue_wait_ms))
        out.verdict = (f"{valid}/{len(self.QUESTIONS)} tool calls valid for the schema; {right} computed the "
                       "expected number")


class Extractor(Agent):
    """Structured output: each reply is a typed record (a pydantic model as response_format)."""
    name = "extractor"
    description = "extracts typed records from sentences"
    SENTENCES = ["Alice is 34 and lives in Paris.", "Bob, 51, moved to Lagos last year.",
                 "The engineer Chen (29) works in Tokyo."]

    def steps(self, session, out):
        from pydantic import BaseModel, Field

        class Person(BaseModel):
            name: str = Field(max_length=40)
            age: int = Field(ge=0, le=150)
            city: str = Field(max_length=40, description="the city only")

        parsed = 0
        for sentence in self.SENTENCES:
            t0 = time.perf_counter()
            reply = session.llm.chat(f"Extract the person: {sentence}", response_format=Person,
                                     max_tokens=self.max_tokens)
            parsed += reply.parsed is not None
            out.exchanges.append(Exchange(sentence, repr(reply.parsed) if reply.parsed else reply.text,
                                          reply.completion_tokens, reply.prompt_tokens, time.perf_counter() - t0,
                                          reply.queue_wait_ms))
        out.verdict = f"{parsed}/{len(self.SENTENCES)} replies parsed as Person records"


ALL_AGENTS = [TravelPlanner, FactChecker, Summarizer, Poet, Translator, Archivist, Calculator, Extractor]


def word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))
