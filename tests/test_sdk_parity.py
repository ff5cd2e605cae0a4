"""The sync and asyncio SDKs run one call table: every public method of one exists in the other with the
same signature, and every RPC of every service in the .proto files is reachable from both."""
from __future__ import annotations

import inspect

import pytest

import kernos.sdk
import kernos.sdk.aio
from kernos.proto.v1 import access_pb2, kernel_pb2, llm_pb2, memory_pb2, storage_pb2, tools_pb2, tuner_pb2
from kernos.sdk import calls, client

FILES = (access_pb2, kernel_pb2, llm_pb2, memory_pb2, storage_pb2, tools_pb2, tuner_pb2)


def public(cls) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(getattr(cls, n)) for n in dir(cls) if not n.startswith("_")
            and callable(getattr(cls, n))}


@pytest.mark.parametrize("group", sorted(calls.GROUPS))
def test_every_sync_method_has_an_async_twin_with_the_same_signature(group):
    sync, aio = client.GROUPS[group], kernos.sdk.aio.GROUPS[group]
    assert public(sync) == public(aio)
    assert public(sync), group
    for name in public(sync):
        fn = getattr(aio, name)
        if getattr(fn, "kind", None) == "stream":
            assert not inspect.iscoroutinefunction(fn)      # an async iterator, used with `async for`
        else:
            assert inspect.iscoroutinefunction(fn), name


def test_sessions_and_connect_match():
    assert inspect.signature(kernos.sdk.connect) == inspect.signature(kernos.sdk.aio.connect)
    for name in ("exit", "close"):
        assert inspect.signature(getattr(kernos.sdk.Session, name)) == \
            inspect.signature(getattr(kernos.sdk.aio.Session, name))
    sync_groups = {n for n, v in vars(kernos.sdk.Session).items()} | {"llm", "kernel", "storage", "memory", "access",
                                                                     "tools", "tuner"}
    assert set(calls.GROUPS) <= sync_groups


def test_every_rpc_of_the_abi_is_in_the_call_table():
    table = {fn.rpc for cls in calls.GROUPS.values() for fn in calls.table_methods(cls).values()}
    abi = {(svc.name, m.name) for f in FILES for svc in f.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    assert abi - table == set(), f"RPCs no SDK method calls: {sorted(abi - table)}"
    assert table - abi == set(), f"table entries naming no RPC: {sorted(table - abi)}"
    for cls in calls.GROUPS.values():          # a table method builds the Call for the RPC it declares
        for fn in calls.table_methods(cls).values():
            assert fn.kind in ("unary", "stream", "loop")


def test_the_async_sdk_drives_a_real_kernel(kernel):
    import asyncio

    async def main():
        async with await kernos.sdk.aio.connect(kernel.address, agent="aio-parity") as s:
            r = await s.tools.call("calculator", expression="6*7")          # the Tools service, missing before
            assert r.result == 42
            await s.storage.write("a.txt", "one")
            await s.storage.write("a.txt", "two")
            assert [f.version for f in await s.storage.history("a.txt")] == [1, 2]
            await s.storage.rollback("a.txt", 1)
            assert (await s.storage.stat("a.txt")).version == 3
            assert await s.storage.read_text("a.txt") == "one"
            chunks = [c async for c in s.llm.stream("hello there", model="echo", max_tokens=4)]
            assert chunks[-1].done and chunks[-1].completion.text == "hello there"
            ids = await s.memory.add(["remember this"])
            assert (await s.memory.update(ids[0], text="remember that")).text == "remember that"
            assert await s.memory.delete(ids) == 1
    asyncio.run(main())
