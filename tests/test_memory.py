"""Memory: long-term vector memory (real chromadb, real MiniLM embeddings), context assembly within token
budgets (the embedded model's real tokenizer), and working contexts through a real kernel."""
from __future__ import annotations

import pytest

import kernos.sdk
from kernos.memory.context import Block, ContextError, plan
from kernos.memory.vector import MemoryError_, VectorMemory


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    return VectorMemory(tmp_path_factory.mktemp("chroma"), max_entries=50)


FACTS = ["Paris is the capital of France.", "Bananas are a yellow fruit rich in potassium.",
         "The kernel schedules agents on a shared GPU.", "Mount Everest is the highest mountain on Earth."]


def test_semantic_search_finds_the_relevant_entry(vm):
    ids = vm.add("alice", FACTS, [{"topic": t} for t in ("geo", "food", "os", "geo")])
    hits = vm.search("alice", "Which city is the French capital?", k=2)
    assert hits[0].id == ids[0] and hits[0].distance < hits[1].distance
    assert vm.search("alice", "what should I eat for potassium?", k=1)[0].id == ids[1]
    geo = vm.search("alice", "tall peaks", k=4, where={"topic": "geo"})
    assert {h.metadata["topic"] for h in geo} == {"geo"} and geo[0].id == ids[3]
    assert vm.search("bob", "capital", k=3) == []  # namespaces are separate


def test_get_update_delete_and_errors(vm):
    [i] = vm.add("carol", ["The meeting is on Tuesday."], [{"kind": "note"}], ["meeting"])
    assert vm.get("carol", ["meeting"])[0].text == "The meeting is on Tuesday."
    vm.update("carol", "meeting", text="The meeting moved to Friday.")
    assert vm.search("carol", "when is the meeting", k=1)[0].text == "The meeting moved to Friday."
    assert vm.get("carol", ["meeting"])[0].metadata == {"kind": "note"}
    with pytest.raises(MemoryError_) as err:
        vm.add("carol", ["again"], ids=["meeting"])
    assert err.value.code == "ALREADY_EXISTS"
    with pytest.raises(MemoryError_) as err:
        vm.get("carol", ["nope"])
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(MemoryError_) as err:
        vm.add("carol", ["  "])
    assert err.value.code == "INVALID_ARGUMENT"
    assert vm.delete("carol", ["meeting", "nope"]) == 1 and vm.count("carol") == 0


def test_entry_quota(vm):
    vm.add("dave", [f"note number {i}" for i in range(50)])
    with pytest.raises(MemoryError_) as err:
        vm.add("dave", ["one too many"])
    assert err.value.code == "RESOURCE_EXHAUSTED"


def test_memory_persists_across_reopen(tmp_path):
    first = VectorMemory(tmp_path / "c", embedder=None)
    first.add("erin", ["Remember the milk."], ids=["m"])
    again = VectorMemory(tmp_path / "c", embedder=first.embed)
    assert again.get("erin", ["m"])[0].text == "Remember the milk."


# -- context assembly with the embedded model's own tokenizer ---------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kernos.kernel.llm.embedded import gguf_path

    p = gguf_path()
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def count_with(tok):
    def count(messages):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(out["input_ids"] if hasattr(out, "keys") else out)
    return count


def blocks_fixture():
    bs = [Block("sys", "system", "You are a helpful planner.", True, "block", "system", 1),
          Block("persona", "system", "Persona: terse, precise.", True, "block", "persona", 2)]
    for i in range(10):
        role = "user" if i % 2 == 0 else "assistant"
        bs.append(Block(f"t{i}", role, f"Turn {i}: " + "words " * (5 + i), False, "turn", "", 3 + i))
    return bs


@pytest.mark.parametrize("budget", [80, 120, 160, 220, 300, 1000])
def test_plan_respects_the_budget_exactly_and_evicts_oldest_first(tokenizer, budget):
    count = count_with(tokenizer)
    blocks = blocks_fixture()
    new = [{"role": "user", "content": "What next?"}]
    messages, evicted, tokens = plan(blocks, new, count, budget)
    assert tokens == count(messages) <= budget
    turns = [b for b in blocks if b.kind == "turn"]
    assert evicted == turns[:len(evicted)]                         # oldest first
    assert messages[:2] == [b.message() for b in blocks[:2]]       # pinned blocks stay, in order
    assert messages[-1] == new[0]
    if evicted:  # maximal: keeping one more turn would overflow
        kept_more = [b.message() for b in blocks[:2]] + [b.message() for b in turns[len(evicted) - 1:]] + new
        assert count(kept_more) > budget


def test_plan_refuses_when_pinned_blocks_alone_overflow(tokenizer):
    with pytest.raises(ContextError) as err:
        plan(blocks_fixture(), [{"role": "user", "content": "hi"}], count_with(tokenizer), 20)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "pinned" in str(err.value)


# -- through the kernel --------------------------------------------------------------------------------
def test_working_context_through_the_kernel(kernel):
    with kernos.sdk.connect(kernel.address, agent="ctx-agent") as s:
        info = s.memory.create_context("plan", budget_tokens=120, system="You plan trips.")
        assert info.budget_tokens == 120 and info.model == "tiny-llama" and info.blocks == 1
        with pytest.raises(kernos.sdk.AlreadyExists):
            s.memory.create_context("plan")
        task = s.memory.add_block("plan", "Task: a weekend in Rome.", label="task")
        prompts = []
        for i in range(6):
            r = s.llm.chat(f"step {i}: what should we book next for the trip", context_id="plan", max_tokens=12)
            assert r.completion_tokens == 12
            prompts.append(r.prompt_tokens)
        assert max(prompts) <= 120                       # every assembled prompt fit the budget
        assert prompts[-1] > prompts[0] and prompts[-1] > 80  # the history is used, up to the budget
        blocks, _ = s.memory.blocks("plan")
        kinds = [(b.kind, b.pinned) for b in blocks]
        assert kinds[:2] == [("block", True), ("block", True)] and blocks[1].block_id == task.block_id
        assert s.memory.contexts()[0].evicted > 0
        hits = s.memory.search("step 0 book the trip", k=3, where={"kind": "evicted_turn"})
        assert hits and all(h.metadata["context"] == "plan" for h in hits)
        assert any("step 0" in h.text for h in hits)
        s.memory.edit_block("plan", task.block_id, content="Task: a weekend in Naples.", pinned=True)
        assert s.memory.blocks("plan")[0][1].content == "Task: a weekend in Naples."
        with pytest.raises(kernos.sdk.NotFound):
            s.llm.chat("hi", context_id="nope")
        with pytest.raises(kernos.sdk.InvalidArgument):
            s.llm.chat("hi", context_id="plan", model="tiny-jamba")
        s.memory.delete_context("plan")
        assert s.memory.contexts() == []


def test_context_with_summary_block(kernel):
    with kernos.sdk.connect(kernel.address, agent="summ-agent") as s:
        s.memory.create_context("talk", budget_tokens=160, summarize=True, system="Chat.")
        for i in range(5):
            s.llm.chat(f"message {i} about the agent kernel", context_id="talk", max_tokens=10)
        blocks, _ = s.memory.blocks("talk")
        summary = [b for b in blocks if b.kind == "summary"]
        assert len(summary) == 1 and summary[0].content.startswith("Summary of the earlier conversation:")


def test_vector_memory_syscalls_and_isolation(kernel):
    with kernos.sdk.connect(kernel.address, agent="mem-a") as a, kernos.sdk.connect(kernel.address, agent="mem-b") as b:
        ids = a.memory.add(FACTS, {"src": "facts"})
        assert a.memory.search("French capital city", k=1)[0].id == ids[0]
        assert b.memory.search("French capital city", k=1) == []
        with pytest.raises(kernos.sdk.PermissionDenied):
            b.memory.search("x", namespace="mem-a")
        assert a.memory.update(ids[0], metadata={"src": "edited"}).metadata == {"src": "edited"}
        assert a.memory.get([ids[0]])[0].metadata == {"src": "edited"}
        assert a.memory.delete(ids) == 4
        with pytest.raises(kernos.sdk.InvalidArgument):
            a.memory.search("")


def test_semantic_search_over_indexed_files(kernel):
    with kernos.sdk.connect(kernel.address, agent="librarian") as s:
        s.storage.write("notes/france.md", "Paris is the capital of France and sits on the Seine.", index=True)
        s.storage.write("notes/fruit.md", "Bananas are yellow and full of potassium.", index=True)
        s.storage.write("notes/plain.txt", "The capital of Spain is Madrid.")  # not indexed
        hits = s.storage.search("Which river runs through the French capital?", k=2)
        assert [h.path for h in hits][0] == "notes/france.md" and "Seine" in hits[0].snippet
        assert "notes/plain.txt" not in [h.path for h in s.storage.search("capital of Spain", k=5)]
        s.storage.write("notes/fruit.md", "Apples are red or green and crunchy.", index=True)  # re-indexed
        top = s.storage.search("crunchy red apples", k=1)[0]
        assert top.path == "notes/fruit.md" and top.version == 2 and "Apples" in top.snippet
        s.storage.rollback("notes/fruit.md", 1)
        assert "Bananas" in s.storage.search("yellow potassium", k=1)[0].snippet
        s.storage.delete("notes/france.md")
        assert "notes/france.md" not in [h.path for h in s.storage.search("capital of France", k=5)]
        with pytest.raises(kernos.sdk.InvalidArgument, match="UTF-8"):
            s.storage.write("bin.dat", b"\xff\xfe\x00", index=True)


def test_vector_memory_on_a_chroma_server(tmp_path, vm):
    """The deployment switch: the same VectorMemory against a Chroma server (`chroma run`) over HTTP."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    chroma = Path(sys.executable).parent / "chroma"
    if not chroma.exists():
        chroma = Path(shutil.which("chroma") or "")
    assert chroma.exists(), "the chromadb package ships the `chroma` server CLI"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(chroma), "run", "--path", str(tmp_path / "srv"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        remote = None
        while remote is None:
            try:
                remote = VectorMemory(http=("127.0.0.1", port), embedder=vm.embed)
                remote.count("probe")
            except Exception:
                remote = None
                assert time.time() < deadline and server.poll() is None, "chroma server did not start"
                time.sleep(0.3)
        ids = remote.add("remote-agent", FACTS)
        assert remote.search("remote-agent", "capital of France", k=1)[0].id == ids[0]
        assert remote.count("remote-agent") == 4
    finally:
        server.terminate()
        server.wait(30)
