"""OpenAI's Responses API on a real kernel (issue 32), through the real `openai` client and the OpenAI Agents SDK
with its default Responses model: text, function tools and their outputs, structured output, streams that
reassemble to the stored response, `previous_response_id` chains private to their agent and surviving a restart,
input items, delete, truncation, and fields refused by name."""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

import kernos.sdk
from kernos.agents.demo import start_kernel, stop_kernel

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def rk(tmp_path_factory):
    from conftest import write_config

    d = tmp_path_factory.mktemp("responses")
    cfg = str(write_config(d / "k.toml", [{"name": MODEL, "path": "embedded"}]))
    kernel = {"proc": start_kernel(d / "data", cfg, timeout=300)}

    tokens: dict[str, str] = {}

    def client(agent: str) -> openai.OpenAI:
        proc, address = kernel["proc"]
        if agent not in tokens:                  # tokens are durable: the same after a restart
            tokens[agent] = kernos.sdk.connect(address, agent=agent).token
        return openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key=tokens[agent], max_retries=0)

    def restart():
        assert stop_kernel(kernel["proc"][0]) == 0
        kernel["proc"] = start_kernel(d / "data", cfg, timeout=300)

    yield client, restart
    assert stop_kernel(kernel["proc"][0]) == 0


def test_text_and_a_chain_private_to_its_agent_surviving_a_restart(rk):
    client, restart = rk
    c = client("resp-a")
    first = c.responses.create(model=MODEL, input="My name is Ada. Remember it.", max_output_tokens=24,
                               instructions="You are brief.", metadata={"run": "1"}, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text and first.output[0].type == "message"
    assert first.usage.input_tokens > 0 and first.metadata == {"run": "1"}
    second = c.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=16, temperature=0)
    assert second.previous_response_id == first.id
    # the chain is the conversation: the same reply as chat completions given it whole (instructions are not
    # carried over, as OpenAI's)
    whole = c.chat.completions.create(model=MODEL, max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}])
    assert second.output_text == whole.choices[0].message.content
    assert second.usage.input_tokens == whole.usage.prompt_tokens
    assert c.responses.retrieve(second.id).output_text == second.output_text
    items = c.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "What is my name?"
    other = client("resp-b")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=MODEL, input="And mine?", previous_response_id=first.id)
    restart()
    c = client("resp-a")
    assert c.responses.retrieve(second.id).output_text == second.output_text
    third = c.responses.create(model=MODEL, input="Say my name again.", previous_response_id=second.id,
                               max_output_tokens=16)
    assert third.usage.input_tokens > second.usage.input_tokens
    c.responses.delete(third.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(third.id)
    unstored = c.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_function_calls_their_outputs_and_a_stream_equal_to_the_stored_response(rk):
    client, _ = rk
    c = client("resp-tools")
    r = c.responses.create(model=MODEL, input="How is the weather in Paris?", tools=[WEATHER],
                           tool_choice="required", max_output_tokens=64)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls and calls[0].name == "get_weather"
    assert "city" in json.loads(calls[0].arguments)
    follow = c.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=32,
                                input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                        "output": "Sunny, 24 C"}])
    assert follow.output_text
    events, final = [], None
    with c.responses.stream(model=MODEL, input="How is the weather in Oslo?", tools=[WEATHER],
                            tool_choice="required", max_output_tokens=64) as stream:
        for ev in stream:
            events.append(ev.type)
        final = stream.get_final_response()
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in events and "response.output_item.done" in events
    stored = c.responses.retrieve(final.id)
    assert [o.model_dump(exclude={"parsed_arguments"}) for o in stored.output] == \
        [o.model_dump(exclude={"parsed_arguments"}) for o in final.output]
    whole = c.responses.create(model=MODEL, input="How is the weather in Oslo?", tools=[WEATHER],
                               tool_choice="required", max_output_tokens=64)
    assert [(o.name, o.arguments) for o in whole.output] == [(o.name, o.arguments) for o in final.output]
    text_events = []
    with c.responses.stream(model=MODEL, input="Count to five.", max_output_tokens=96, temperature=0,
                            include=["message.output_text.logprobs"], top_logprobs=2) as stream:
        for ev in stream:
            if ev.type == "response.output_text.delta":
                text_events.append(ev.delta)
        final = stream.get_final_response()
    whole = c.responses.create(model=MODEL, input="Count to five.", max_output_tokens=96, temperature=0)
    assert "".join(text_events) == final.output_text == c.responses.retrieve(final.id).output_text
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    logprobs = final.output[0].content[0].logprobs
    assert len(logprobs) == final.usage.output_tokens and all(len(x.top_logprobs) == 2 for x in logprobs)


def test_structured_output_and_refused_fields(rk):
    client, _ = rk
    c = client("resp-parse")

    class Person(BaseModel):
        name: str
        age: int

    r = c.responses.parse(model=MODEL, input="Alice is 42. Extract her.", text_format=Person, max_output_tokens=48)
    assert isinstance(r.output_parsed, Person)
    for bad, field in ((dict(tools=[{"type": "web_search"}]), "web_search"),
                       (dict(reasoning={"effort": "high"}), "reasoning"),
                       (dict(include=["file_search_call.results"]), "include"),
                       (dict(input=[{"type": "input_image", "image_url": "x"}]), "input_image")):
        with pytest.raises(openai.BadRequestError, match=field):
            c.responses.create(**{"model": MODEL, "input": "hi", **bad})


def test_the_openai_agents_sdk_on_its_default_responses_model(rk):
    """The Agents SDK's default model is the Responses one: a function tool, then a multi-turn run continued
    with previous_response_id."""
    from conftest import openai_agents

    oa = openai_agents()
    Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool = (
        oa.Agent, oa.ModelSettings, oa.OpenAIResponsesModel, oa.RunConfig, oa.Runner, oa.function_tool)

    client, _ = rk
    c = client("resp-agents")
    aclient = openai.AsyncOpenAI(base_url=str(c.base_url), api_key=c.api_key, max_retries=0)
    seen = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"Sunny in {city}"

    agent = Agent(name="w", instructions="Use tools to answer.", tools=[get_weather],
                  tool_use_behavior="stop_on_first_tool",
                  model=OpenAIResponsesModel(model=MODEL, openai_client=aclient),
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=96))
    config = RunConfig(tracing_disabled=True)
    result = Runner.run_sync(agent, "How is the weather in Lima?", run_config=config, max_turns=3)
    assert seen and result.final_output == f"Sunny in {seen[0]}" and result.last_response_id
    chat = Agent(name="c", instructions="Answer in a few words.",
                 model=OpenAIResponsesModel(model=MODEL, openai_client=aclient),
                 model_settings=ModelSettings(max_tokens=64, temperature=0))
    one = Runner.run_sync(chat, "What is the capital of France?", run_config=config)
    two = Runner.run_sync(chat, "And of Italy?", run_config=config, previous_response_id=one.last_response_id)
    assert "Paris" in one.final_output
    assert two.final_output
    stored = c.responses.retrieve(two.last_response_id)
    assert stored.previous_response_id == one.last_response_id
    assert stored.usage.input_tokens > c.responses.retrieve(one.last_response_id).usage.input_tokens


def test_items_become_messages_and_truncation_drops_whole_turns():
    from kernos.abi.errors import StatusError
    from kernos.kernel.syscalls.responses import _drop_oldest_turn, to_messages

    items = [{"role": "developer", "content": "be brief"}, {"type": "message", "role": "user",
                                                            "content": [{"type": "input_text", "text": "hi"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\": 1}"},
             {"type": "function_call_output", "call_id": "c1", "output": "one"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
             {"role": "user", "content": "next"}]
    messages = to_messages(items)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert messages[2]["content"] == "Let me look." and [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert messages[4] == {"role": "tool", "tool_call_id": "c2", "content": "two"}
    assert _drop_oldest_turn(messages) == [messages[0], messages[5]]       # the whole turn, its calls and outputs
    assert _drop_oldest_turn([messages[0], messages[5]]) is None
    with pytest.raises(StatusError, match=r"input\[0\].type 'file_search_call'"):
        to_messages([{"type": "file_search_call"}])
