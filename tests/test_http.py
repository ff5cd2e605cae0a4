"""The OpenAI-compatible HTTP API (issue 14, first part), tested with the real `openai` client (sync and
async) against a real kernel on the embedded model: chat, streaming with usage, a forced tool call and the
tool turn after it, json_schema output parsed into a pydantic model, embeddings, and every error status
mapped to the client's exception class. A call over HTTP and one over gRPC by the same agent share its
quota and its traces."""
from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from pydantic import BaseModel

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel
from kernos.storage.traces import TraceLog

MODEL = "smollm2-135m-instruct"
ADMIN = "http-admin-token-0123456789"


@pytest.fixture(scope="module")
def hk(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("http")
    cfg = write_config(d / "k.toml", [{"name": MODEL, "path": "embedded"},
                                      {"name": "echo", "path": "-", "kind": "echo"},
                                      {"name": "vault", "path": "-", "kind": "echo", "restricted": True}],
                       server={"admin_token": ADMIN}, limits={"max_request_bytes": 64 * 1024},
                       quotas={"agents": {"limited": {"requests_per_second": 2},
                                          "limited-both": {"requests_per_second": 2}}})
    proc, address = start_kernel(d / "data", str(cfg), timeout=300)
    session = kernos.sdk.connect(address, agent="http-agent")
    client = openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=session.token, max_retries=0)
    yield client, session, proc.http_address, address, d / "data"
    assert stop_kernel(proc) == 0


def test_models_and_chat(hk):
    client, *_ = hk
    ids = {m.id for m in client.models.list()}
    assert {MODEL, "echo"} <= ids and "vault" not in ids          # a restricted model needs a grant
    assert client.models.retrieve(MODEL).id == MODEL
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of "
                                                                                          "France?"}], max_tokens=16)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = client.completions.create(model="echo", prompt="one two three", max_tokens=2)
    assert r.choices[0].text == "two three" and r.choices[0].finish_reason == "length"


def test_streaming_with_usage(hk):
    client, *_ = hk
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                           max_tokens=24, seed=1)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                            max_tokens=24, seed=1, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_forced_tool_call_then_the_tool_turn(hk):
    client, *_ = hk
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "How is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    import json
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    after = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=24)
    assert after.choices[0].message.content is not None
    stream = client.chat.completions.create(model=MODEL, messages=messages[:1], tools=tools, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            parallel_tool_calls=False, max_tokens=64)
    name, args = "", ""
    for chunk in stream:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += d.function.name or ""
            args += d.function.arguments or ""
    assert name == "get_weather" and isinstance(json.loads(args), dict)


def test_json_schema_output_is_parsed(hk):
    client, *_ = hk

    class Person(BaseModel):
        name: str
        age: int

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Alice is 42. Extract her."}],
                                      response_format=Person, max_tokens=48)
    assert isinstance(r.choices[0].message.parsed, Person)


def test_embeddings(hk):
    client, *_ = hk
    e = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat", "a kitten", "a spreadsheet"])
    a, b, c = (x.embedding for x in e.data)
    assert len(a) == 384

    def dot(x, y):
        return sum(i * j for i, j in zip(x, y))
    assert dot(a, b) > dot(a, c)                          # normalized: cosine; cats are closer to kittens


def test_error_statuses_map_to_the_clients_exceptions(hk):
    client, session, http, address, _ = hk
    base = f"http://{http}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="kn_wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="vault", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages="not a list")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       temperature="hot")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x" * 100_000}])
    assert err.value.status_code == 413
    limited = kernos.sdk.connect(address, agent="limited")
    lc = openai.OpenAI(base_url=base, api_key=limited.token, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(10):
            lc.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert int(err.value.response.headers["retry-after"]) >= 1
    r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "still here"}],
                                       extra_body={"priority": 3}, user="u1", metadata={"k": "v"})
    assert r.choices[0].message.content == "still here"
    with pytest.raises(openai.BadRequestError, match="unknown_field"):       # never silently ignored (issue 32)
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"unknown_field": 1})


def test_sampling_fields_are_honoured_or_refused(hk):
    """Issue 32: each sampling field has its effect, the same over /v1 as over gRPC, or is a 400 naming it;
    streamed log-probabilities come chunk by chunk."""
    client, session, *_ = hk
    msgs = [{"role": "user", "content": "Name three colours."}]
    base = session.llm.chat(msgs, model=MODEL, max_tokens=8, logprobs=True).choices[0]
    first, second = base.logprobs[0], base.logprobs[1]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, logprobs=True,
                                       logit_bias={str(first.token_id): -100})
    assert r.choices[0].logprobs.content[0].token != first.token
    assert session.llm.chat(msgs, model=MODEL, max_tokens=8, logit_bias={first.token_id: -100}).text == \
        r.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                       extra_body={"stop_token_ids": [second.token_id]})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == first.token.strip()
    shaped = dict(frequency_penalty=1.5, presence_penalty=0.5)
    vllm_fields = dict(repetition_penalty=1.3, min_p=0.2, top_k=20)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0.9, seed=4, **shaped,
                                       extra_body=vllm_fields)
    g = session.llm.chat(msgs, model=MODEL, max_tokens=24, temperature=0.9, seed=4, **shaped, **vllm_fields)
    plain = session.llm.chat(msgs, model=MODEL, max_tokens=24, temperature=0.9, seed=4)
    assert r.choices[0].message.content == g.text != plain.text
    for bad, field in ((dict(presence_penalty=3), "presence_penalty"), (dict(logit_bias={"x": 1}), "logit_bias"),
                       (dict(extra_body={"min_tokens": 99}), "min_tokens"),
                       (dict(extra_body={"stop_token_ids": [10 ** 9]}), "stop_token_ids"),
                       (dict(prediction={"type": "content", "content": "x"}), "prediction"),
                       (dict(modalities=["text", "audio"]), "modalities"), (dict(service_tier="flex"), "service_tier"),
                       (dict(extra_body={"suffix": "x"}), "suffix")):
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, **bad)
    with pytest.raises(openai.BadRequestError, match="does not support sampling.frequency_penalty"):
        client.completions.create(model="echo", prompt="one two", frequency_penalty=1.0)
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, logprobs=True, top_logprobs=2)
    chunks = [c.choices[0].logprobs.content for c in client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=16, logprobs=True, top_logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert len(chunks) > 3
    assert [x.token for c in chunks for x in c] == [x.token for x in whole.choices[0].logprobs.content]
    assert all(len(x.top_logprobs) == 2 for c in chunks for x in c)
    sdk_chunks = list(session.llm.stream(msgs, model=MODEL, max_tokens=16, logprobs=True))
    assert [x.token_id for c in sdk_chunks for x in c.logprobs] == \
        [x.token_id for x in sdk_chunks[-1].completion.choices[0].logprobs]


def test_completions_echo_scores_the_prompt(hk):
    """Issue 32: /v1/completions with echo and logprobs gives the prompt's logprobs (max_tokens 0: only those),
    as lm-eval-harness's log-likelihood requests read them, equal to the SDK's score."""
    client, session, *_ = hk
    text = "The capital of France is Paris"
    r = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=2, max_tokens=0)
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) >= x - 1e-6 for x, top in zip(lp.token_logprobs[1:],
                                                                                 lp.top_logprobs[1:]))
    scored = session.llm.score(text, model=MODEL, top_logprobs=2)
    assert [x.token for x in scored.prompt_logprobs] == lp.tokens
    assert all(abs(a.logprob - b) < 1e-4 for a, b in zip(scored.prompt_logprobs[1:], lp.token_logprobs[1:]))
    assert scored.completion_tokens == 0 and scored.prompt_logprob < 0
    paris = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0)
    rome = client.completions.create(model=MODEL, prompt="The capital of France is Rome", echo=True, logprobs=0,
                                     max_tokens=0)
    assert paris.choices[0].logprobs.token_logprobs[-1] > rome.choices[0].logprobs.token_logprobs[-1]
    more = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=1, max_tokens=3)
    assert more.choices[0].text.startswith(text) and len(more.choices[0].logprobs.tokens) == len(lp.tokens) + 3
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=3, stream=True, echo=True)
    assert "".join(x.choices[0].text for x in plain if x.choices).startswith(text)
    # lm-eval-harness's local-completions shape: token-id prompts in a batch, echo, one token, logprobs=1
    ids = [x.token_id for x in scored.prompt_logprobs]
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:4]], echo=True, logprobs=1, max_tokens=1,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    for c, n in zip(batch.choices, (len(ids), 4)):
        assert len(c.logprobs.token_logprobs) == n + 1 and c.logprobs.token_logprobs[0] is None
    assert batch.choices[0].logprobs.tokens[:-1] == lp.tokens and batch.choices[0].text.startswith(text)
    assert all(abs(a - b) < 1e-4 for a, b in zip(batch.choices[0].logprobs.token_logprobs[1:-1],
                                                  lp.token_logprobs[1:]))
    assert session.llm.complete(ids, model=MODEL, max_tokens=4, temperature=0).text == \
        client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt=text, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="cannot score"):
        client.completions.create(model="echo", prompt=text, echo=True, logprobs=1, max_tokens=0)


def test_async_client(hk):
    _, session, http, *_ = hk

    async def main():
        c = openai.AsyncOpenAI(base_url=f"http://{http}/v1", api_key=session.token, max_retries=0)
        replies = await asyncio.gather(*(c.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"n {i}"}]) for i in range(8)))
        assert [r.choices[0].message.content for r in replies] == [f"n {i}" for i in range(8)]
        chunks = [ch async for ch in await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True)]
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        await c.close()

    asyncio.run(main())


def test_http_and_grpc_calls_share_the_agents_quota_and_traces(hk):
    _, _, http, address, data = hk
    agent = kernos.sdk.connect(address, agent="limited-both")
    marker = f"http marker {time.time()}"
    c = openai.OpenAI(base_url=f"http://{http}/v1", api_key=agent.token, max_retries=0)
    c.chat.completions.create(model="echo", messages=[{"role": "user", "content": marker}])
    agent.llm.chat(marker, model="echo")
    log = TraceLog.__new__(TraceLog)
    log.path = data / "traces.db"
    deadline = time.time() + 10
    while time.time() < deadline:
        recs = [r for r in log.query(agent_id="limited-both", kind="llm.generate") if marker in str(r.request)]
        if len(recs) >= 2:
            break
        time.sleep(0.1)
    assert len(recs) == 2 and all(r.status == "OK" and r.response["text"] == marker for r in recs)
    time.sleep(1.1)                                              # 2 requests per second, whatever the transport
    agent.kernel.heartbeat()
    c.models.list()
    with pytest.raises(kernos.sdk.ResourceExhausted):
        agent.kernel.heartbeat()
    time.sleep(1.1)
    # A grant made over gRPC opens a restricted model over HTTP.
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="vault", messages=[{"role": "user", "content": "open"}])
    time.sleep(1.1)
    admin = kernos.sdk.connect(address, token=ADMIN)
    admin.access.grant("limited-both", "model", "execute", resource="vault")
    assert c.chat.completions.create(model="vault", messages=[{"role": "user", "content": "open"}]
                                     ).choices[0].message.content == "open"
    time.sleep(1.1)
    # A context made over gRPC is used over HTTP: the kernel adds the turn to it.
    agent.memory.create_context("shared", budget_tokens=256, system="Be brief.", model="echo")
    time.sleep(1.1)
    before = len(agent.memory.blocks("shared")[0])
    time.sleep(1.1)
    c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "remember me"}],
                              extra_body={"context_id": "shared"})
    time.sleep(1.1)
    blocks, _ = agent.memory.blocks("shared")
    assert len(blocks) == before + 2 and "remember me" in " ".join(b.content for b in blocks)


def test_langchain_chat_openai_and_a_langgraph_react_agent(hk):
    """LangChain's ChatOpenAI against the kernel: bind_tools with a forced tool, then LangGraph's prebuilt
    ReAct agent calling a Python tool and answering from its result. The 135M model seldom chooses a tool by
    itself (tool_choice auto), so the agent's model asks for Kernos's `first_tool_choice: required`: a call
    until a tool result answers the question, then the model's own choice."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    _, session, http, *_ = hk
    seen = []

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return f"It is sunny and 21 C in {city}."

    llm = ChatOpenAI(base_url=f"http://{http}/v1", api_key=session.token, model=MODEL, max_tokens=128,
                     temperature=0, max_retries=0)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("How is the weather in Paris?")
    assert forced.tool_calls[0]["name"] == "get_weather" and forced.tool_calls[0]["args"]["city"]
    react_llm = ChatOpenAI(base_url=f"http://{http}/v1", api_key=session.token, model=MODEL, max_tokens=128,
                           temperature=0, max_retries=0, extra_body={"first_tool_choice": "required"})
    agent = create_react_agent(react_llm.bind_tools([get_weather], parallel_tool_calls=False), [get_weather])
    out = agent.invoke({"messages": [("user", "How is the weather in Paris?")]}, {"recursion_limit": 8})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds[:4] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"] and seen
    assert "21" in out["messages"][-1].content or "sunny" in out["messages"][-1].content.lower()


def test_openai_agents_sdk_runs_a_function_tool(hk):
    from conftest import openai_agents

    oa = openai_agents()
    Agent, ModelSettings, Runner, function_tool = oa.Agent, oa.ModelSettings, oa.Runner, oa.function_tool
    OpenAIChatCompletionsModel, set_tracing_disabled = oa.OpenAIChatCompletionsModel, oa.set_tracing_disabled

    _, session, http, *_ = hk
    set_tracing_disabled(True)                        # no network: the SDK's traces go nowhere
    calls = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    client = openai.AsyncOpenAI(base_url=f"http://{http}/v1", api_key=session.token, max_retries=0)
    agent = Agent(name="adder", instructions="Use the add tool.", tools=[add], tool_use_behavior="stop_on_first_tool",
                  model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=96))
    result = asyncio.run(Runner.run(agent, "What is 2 plus 3?"))
    assert calls and str(result.final_output) == str(sum(calls[0]))


def test_litellm_as_a_client(hk):
    """Issue 32: LiteLLM, unchanged, as a client of /v1: chat, a forced tool call, a stream, and the Responses
    API through its `responses()`."""
    import os

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"        # no network: its bundled model map
    import litellm

    _, session, http, *_ = hk
    kw = dict(model=f"openai/{MODEL}", api_base=f"http://{http}/v1", api_key=session.token)
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    r = litellm.completion(messages=ask, max_tokens=16, **kw)
    assert "Paris" in r.choices[0].message.content and r.usage.completion_tokens > 0
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = litellm.completion(messages=[{"role": "user", "content": "How is the weather in Paris?"}], tools=tools,
                           tool_choice="required", max_tokens=64, **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=ask, max_tokens=16,
                                                                                stream=True, **kw))
    assert "Paris" in text
    resp = litellm.responses(input="What is the capital of France?", max_output_tokens=16, **kw)
    assert "Paris" in resp.output[0].content[0].text


def test_lm_eval_harness_against_the_kernel(hk, tmp_path, monkeypatch):
    """Issue 32: lm-eval-harness's local-completions model, unchanged, runs a log-likelihood task and a generation
    task (defined in tests/data/lm_eval, local data) against the kernel; its log-likelihoods are the kernel's own
    scores of the same tokens, its generations the kernel's greedy replies."""
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    _, session, http, _, data = hk
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OPENAI_API_KEY", session.token)
    here = Path(__file__).parent / "data" / "lm_eval"
    for f in here.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text().replace("DATA/", f"{here}/"))
    tokenizer = str(data / "models" / MODEL)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["kernos_capitals_mc", "kernos_capitals_gen"], log_samples=True,
        model_args={"model": MODEL, "base_url": f"http://{http}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": tokenizer, "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True},
        task_manager=TaskManager(include_path=str(tmp_path)), random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0)
    assert 0 <= out["results"]["kernos_capitals_mc"]["acc,none"] <= 1
    assert 0 <= out["results"]["kernos_capitals_gen"]["exact_match,none"] <= 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    samples = out["samples"]["kernos_capitals_mc"]
    assert len(samples) == 6
    for sample in samples[:2]:                           # each choice's log-likelihood: the kernel's score
        for args, resp in zip(sample["arguments"], sample["resps"]):
            ctx, cont = args
            ll = resp[0][0]
            ids = tok.encode(ctx, add_special_tokens=False)
            more = tok.encode(ctx + cont, add_special_tokens=False)[len(ids):]
            scored = session.llm.score(ids + more, model=MODEL).prompt_logprobs
            assert abs(ll - sum(x.logprob for x in scored[len(ids):])) < 1e-3
    for sample in out["samples"]["kernos_capitals_gen"][:2]:
        prompt = sample["arguments"][0][0]
        reply = session.llm.complete(prompt, model=MODEL, max_tokens=12, temperature=0, stop=["\n", "."])
        assert sample["resps"][0][0] == reply.text


def test_adapters_as_models_and_503_while_draining(tiny_models, lora_adapters, tmp_path):
    """Each adapter the caller may use is a model "MODEL:ADAPTER" (restricted ones only once granted); a
    draining kernel answers new HTTP calls with 503 while running ones finish."""
    import signal
    import threading

    from conftest import write_config

    cfg = write_config(tmp_path / "k.toml", [{"name": "tiny", "path": str(tiny_models["llama"]),
                                              "adapters": {k: str(v) for k, v in lora_adapters.items()},
                                              "restricted_adapters": ["beta"]}],
                       server={"admin_token": ADMIN, "drain_timeout_s": 30})
    proc, address = start_kernel(tmp_path / "data", str(cfg), timeout=120)
    try:
        s = kernos.sdk.connect(address, agent="adapted")
        c = openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=s.token, max_retries=0)
        assert {m.id for m in c.models.list()} == {"tiny", "tiny:alpha"}
        kernos.sdk.connect(address, token=ADMIN).access.grant("adapted", "model", "execute", resource="tiny/beta")
        assert {m.id for m in c.models.list()} == {"tiny", "tiny:alpha", "tiny:beta"}
        r = c.chat.completions.create(model="tiny:alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.model == "tiny:alpha"
        done = {}
        long = threading.Thread(target=lambda: done.setdefault("r", c.completions.create(   # seconds of work
            model="tiny", prompt="the agent", max_tokens=1500, stop=["never-appears-xyz"])))
        long.start()
        while s.kernel.stats().models[0].running == 0:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        with grpc.insecure_channel(address) as ch:          # the kernel has begun to drain
            check = health_pb2_grpc.HealthStub(ch).Check
            while check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.01)
        time.sleep(0.1)
        with pytest.raises(openai.InternalServerError) as err:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "late"}], max_tokens=2)
        assert err.value.status_code == 503
        long.join(60)
        assert done["r"].usage.completion_tokens == 1500 and proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            stop_kernel(proc)


def test_prometheus_metrics(hk):
    from prometheus_client.parser import text_string_to_metric_families

    client, session, http, address, _ = hk
    import httpx

    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "count me in"}])
    assert httpx.get(f"http://{http}/metrics").status_code == 401
    assert httpx.get(f"http://{http}/metrics", headers={"Authorization": f"Bearer {session.token}"}).status_code == 403
    r = httpx.get(f"http://{http}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("kernos:num_requests_running", "kernos:num_requests_waiting", "kernos:kv_cache_usage_perc",
                 "kernos:time_to_first_token_seconds", "kernos:generation_tokens", "kernos:agent_generation_tokens"):
        assert name in families, name
    def value(family, **labels):
        return next(s.value for s in families[family].samples
                    if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"))
    assert value("kernos:generation_tokens", model="echo") >= 3
    assert value("kernos:time_to_first_token_seconds", model="echo") >= 0           # the first bucket's count
    ttft_count = next(s.value for s in families["kernos:time_to_first_token_seconds"].samples
                      if s.name.endswith("_count") and s.labels.get("model") == "echo")
    assert ttft_count >= 1
    assert value("kernos:agent_generation_tokens", agent="http-agent") >= 3


def test_a_program_spans_calls_and_transports_and_keeps_its_kv_through_a_tool_pause(hk):
    """Issue 33: an agent program named over /v1 (a header, or `program_id` through extra_body) and over gRPC
    (the SDK's program_id) is one kernel object: its calls, tokens computed and tool pauses are counted in the
    kernel's stats. A reply that ends in a tool call pins the call's KV for the program; the follow-up carrying
    the tool's result reuses it. A conversation that names no program is one by default."""
    client, session, http, *_ = hk
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}}]
    system = {"role": "system", "content": "You plan trips. Check the weather with the tool before you answer."}
    messages = [system, {"role": "user", "content": "How is the weather in Rome today?"}]

    def stats():
        st = session.kernel.stats()
        return ({p.program_id: p for p in st.programs}, {m.name: m for m in st.models}[MODEL])

    _, m0 = stats()
    named = openai.OpenAI(base_url=f"http://{http}/v1", api_key=session.token, max_retries=0,
                          default_headers={"X-Kernos-Program": "trip-rome"})
    r = named.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=64)
    assert r.choices[0].finish_reason == "tool_calls"
    programs, m1 = stats()
    p = programs["trip-rome"]
    assert p.state == "paused" and list(p.paused_on) == ["get_weather"] and p.calls == 1
    assert p.service_tokens > r.usage.completion_tokens and p.agent_id == "http-agent"
    assert m1.tool_pauses["pinned"] == m0.tool_pauses.get("pinned", 0) + 1
    time.sleep(0.3)                                             # the tool runs
    call = r.choices[0].message.tool_calls[0]
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    reply = session.llm.chat(messages, tools=tools, model=MODEL, max_tokens=16, program_id="trip-rome")
    assert reply.completion_tokens > 0
    programs, m2 = stats()
    p = programs["trip-rome"]
    assert p.calls == 2 and p.tool_pauses == 1 and p.tool_pause_s >= 0.3 and p.state == "idle"
    assert m2.tool_pauses["reused"] == m1.tool_pauses.get("reused", 0) + 1
    assert m2.prefix_tokens_reused - m1.prefix_tokens_reused >= r.usage.prompt_tokens // 128 * 128 > 0
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body={"program_id": "trip-rome"})
    assert stats()[0]["trip-rome"].calls == 3
    # no id at all: the conversation's opening names it, the same for its next call
    convo = [system, {"role": "user", "content": "And in Oslo?"}]
    client.chat.completions.create(model=MODEL, messages=convo, max_tokens=4)
    client.chat.completions.create(model=MODEL, messages=convo + [{"role": "assistant", "content": "Let me see."},
                                                                  {"role": "user", "content": "Thanks."}], max_tokens=4)
    assert sorted(p.calls for pid, p in stats()[0].items() if pid.startswith("conv:")) [-1] >= 2
    with pytest.raises(openai.BadRequestError, match="program_id"):
        client.chat.completions.create(model=MODEL, messages=convo, max_tokens=4, extra_body={"program_id": "x" * 200})


def test_a_reply_that_restates_its_prompt_takes_drafts_counted_in_stats_and_metrics(hk):
    """Issue 33, prompt lookup: an agent restating a record through /v1 drafts from its prompt on the own kernels
    (alone in its batch); the drafts are counted per model in Stats and `/metrics`. (That the tokens equal those
    of plain decoding is tests/test_prompt_lookup.py's.)"""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from kernos.kernel.llm import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("the own bf16 kernels do not run here: no prompt lookup")
    client, session, http, *_ = hk

    def model():
        return {m.name: m for m in session.kernel.stats().models}[MODEL]
    m0 = model()
    record = {"order_id": "A-1042", "customer": "Dana Okafor", "status": "pending", "city": "Lagos"}
    r = client.chat.completions.create(model=MODEL, max_tokens=48, messages=[
        {"role": "user", "content": f"Here is an order record: {json.dumps(record)}\nRepeat the record exactly."}])
    assert r.usage.completion_tokens > 8
    m1 = model()
    assert m1.draft_tokens > m0.draft_tokens and m1.draft_accepted > m0.draft_accepted
    assert m1.draft_accepted <= m1.draft_tokens
    text = httpx.get(f"http://{http}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    samples = {(s.name, s.labels.get("model")): s.value for f in text_string_to_metric_families(text)
               for s in f.samples}
    assert samples[("kernos:spec_decode_num_accepted_tokens_total", MODEL)] == m1.draft_accepted
    assert samples[("kernos:spec_decode_num_draft_tokens_total", MODEL)] == m1.draft_tokens
