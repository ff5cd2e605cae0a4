"""The asyncio twin of `kernos.sdk`: the same call table (`kernos.sdk.calls`), so the same names and
signatures; calls are awaitable and streams are async iterators.

    async with await kernos.sdk.aio.connect(address, agent="planner") as s:
        reply = await s.llm.chat("Plan a trip")
"""
from __future__ import annotations

import asyncio
import functools

import grpc

from . import calls
from ._wire import (
    CHANNEL_OPTIONS,
    auth_metadata,
    read_token_file,
    resolve_address,
    save_token_file,
    tls_credentials,
)
from .client import STUBS
from .errors import Unauthenticated, Unavailable, from_rpc_error
from .functions import arun_tools as run_tools  # noqa: F401  (kernos.sdk.aio.run_tools)


class Executor:
    """Runs call-table entries as asyncio gRPC calls on one channel with one token."""

    def __init__(self, channel, metadata):
        self.metadata = metadata
        self._stubs = {name: stub(channel) for name, stub in STUBS.items()}

    async def unary(self, call: calls.Call):
        try:
            reply = await getattr(self._stubs[call.service], call.rpc)(call.request, metadata=self.metadata,
                                                                        timeout=call.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.convert(reply)

    async def stream(self, call: calls.Call):
        rpc = getattr(self._stubs[call.service], call.rpc)(call.request, metadata=self.metadata, timeout=call.timeout)
        try:
            async for chunk in rpc:
                yield call.convert(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            rpc.cancel()

    async def loop(self, steps):
        result = None
        try:
            while True:
                step = steps.send(result)
                if isinstance(step, calls.Sleep):
                    await asyncio.sleep(step.seconds)
                    result = None
                else:
                    result = await self.unary(step)
        except StopIteration as done:
            return done.value


def _wrap(kind: str, fn):
    if kind == "stream":
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            return self._x.stream(fn(self, *args, **kwargs))
    elif kind == "loop":
        @functools.wraps(fn)
        async def method(self, *args, **kwargs):
            return await self._x.loop(fn(self, *args, **kwargs))
    else:
        @functools.wraps(fn)
        async def method(self, *args, **kwargs):
            return await self._x.unary(fn(self, *args, **kwargs))
    return method


GROUPS = {name: calls.bind(cls, _wrap) for name, cls in calls.GROUPS.items()}
LLM, Storage, Memory, Access, Tools, Tuner, KernelCalls = (GROUPS[n] for n in (
    "llm", "storage", "memory", "access", "tools", "tuner", "kernel"))


class Session:
    def __init__(self, channel: grpc.aio.Channel, agent_id: str, token: str):
        self.channel = channel
        self.agent_id = agent_id
        self.token = token
        self.metadata = auth_metadata(token)
        x = Executor(channel, self.metadata)
        self.llm, self.kernel, self.storage, self.memory = LLM(x), KernelCalls(x), Storage(x), Memory(x)
        self.access, self.tools, self.tuner = Access(x), Tools(x), Tuner(x)

    async def exit(self) -> None:
        """End the session (the name and token stay this agent's) and close the channel."""
        try:
            await self.kernel._exit()
        finally:
            await self.channel.close()

    async def close(self) -> None:
        """Close the channel; the session idles out. Reconnect later with `token`."""
        await self.channel.close()

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.exit()


async def connect(address: str | None = None, agent: str = "agent", token: str | None = None, *,
                  description: str = "", labels: dict[str, str] | None = None, timeout: float = 10.0,
                  tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                  credential: str | None = None, token_file: str | None = None) -> Session:
    """See `kernos.sdk.connect`."""
    creds = tls_credentials(tls_ca, tls_cert, tls_key)
    channel = (grpc.aio.secure_channel(resolve_address(address), creds, options=CHANNEL_OPTIONS) if creds
               else grpc.aio.insecure_channel(resolve_address(address), options=CHANNEL_OPTIONS))
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        await channel.close()
        raise Unavailable(f"no kernel answered at {resolve_address(address)} within {timeout} s") from None
    try:
        saved = read_token_file(token_file) if token is None and token_file else None
        if saved is not None:
            try:
                await KernelCalls(Executor(channel, auth_metadata(saved))).heartbeat()
                return Session(channel, agent, saved)
            except Unauthenticated:
                pass                     # not known to this kernel (or revoked): register below
        if token is None:
            register = KernelCalls(Executor(channel, auth_metadata(credential) if credential else ()))
            agent_id, token = await register._register(agent, description, labels)
            if token_file:
                save_token_file(token_file, token)
            return Session(channel, agent_id, token)
        await KernelCalls(Executor(channel, auth_metadata(token))).heartbeat()
        return Session(channel, agent, token)
    except BaseException:
        await channel.close()
        raise
