"""The synchronous client. `connect()` registers an agent (or resumes one with its token) and returns a
`Session` whose attributes group the syscalls by service; the syscalls themselves are the call table in
`kernos.sdk.calls`, run here by a blocking executor."""
from __future__ import annotations

import functools
import time

import grpc

from kernos.proto.v1 import (
    access_pb2_grpc,
    kernel_pb2_grpc,
    llm_pb2_grpc,
    memory_pb2_grpc,
    storage_pb2_grpc,
    tools_pb2_grpc,
    tuner_pb2_grpc,
)

from . import calls
from ._wire import (
    CHANNEL_OPTIONS,
    auth_metadata,
    read_token_file,
    resolve_address,
    save_token_file,
    tls_credentials,
)
from .errors import Unauthenticated, Unavailable, from_rpc_error

STUBS = {"LLM": llm_pb2_grpc.LLMStub, "Kernel": kernel_pb2_grpc.KernelStub, "Storage": storage_pb2_grpc.StorageStub,
         "Memory": memory_pb2_grpc.MemoryStub, "Access": access_pb2_grpc.AccessStub, "Tools": tools_pb2_grpc.ToolsStub,
         "Tuner": tuner_pb2_grpc.TunerStub}


class Executor:
    """Runs call-table entries as blocking gRPC calls on one channel with one token."""

    def __init__(self, channel, metadata):
        self.metadata = metadata
        self._stubs = {name: stub(channel) for name, stub in STUBS.items()}

    def unary(self, call: calls.Call):
        try:
            reply = getattr(self._stubs[call.service], call.rpc)(call.request, metadata=self.metadata,
                                                                  timeout=call.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.convert(reply)

    def stream(self, call: calls.Call):
        """The chunks of a streaming call; leaving early (break, error) cancels it in the kernel."""
        rpc = getattr(self._stubs[call.service], call.rpc)(call.request, metadata=self.metadata, timeout=call.timeout)
        try:
            for chunk in rpc:
                yield call.convert(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            rpc.cancel()

    def loop(self, steps):
        result = None
        try:
            while True:
                step = steps.send(result)
                if isinstance(step, calls.Sleep):
                    time.sleep(step.seconds)
                    result = None
                else:
                    result = self.unary(step)
        except StopIteration as done:
            return done.value


def _wrap(kind: str, fn):
    if kind == "stream":
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            yield from self._x.stream(fn(self, *args, **kwargs))
    elif kind == "loop":
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            return self._x.loop(fn(self, *args, **kwargs))
    else:
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            return self._x.unary(fn(self, *args, **kwargs))
    return method


GROUPS = {name: calls.bind(cls, _wrap) for name, cls in calls.GROUPS.items()}
LLM, Storage, Memory, Access, Tools, Tuner, KernelCalls = (GROUPS[n] for n in (
    "llm", "storage", "memory", "access", "tools", "tuner", "kernel"))


class Session:
    """A registered agent's connection to the kernel. Use as a context manager to exit on leave."""

    def __init__(self, channel: grpc.Channel, agent_id: str, token: str):
        self.channel = channel
        self.agent_id = agent_id
        self.token = token
        self.metadata = auth_metadata(token)
        x = Executor(channel, self.metadata)
        self.llm, self.kernel, self.storage, self.memory = LLM(x), KernelCalls(x), Storage(x), Memory(x)
        self.access, self.tools, self.tuner = Access(x), Tools(x), Tuner(x)

    def exit(self) -> None:
        """End the session (the name and token stay this agent's) and close the channel."""
        try:
            self.kernel._exit()
        finally:
            self.channel.close()

    def close(self) -> None:
        """Close the channel; the session idles out. Reconnect later with `token`."""
        self.channel.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()


def connect(address: str | None = None, agent: str = "agent", token: str | None = None, *, description: str = "",
            labels: dict[str, str] | None = None, timeout: float = 10.0, tls_ca: str | None = None,
            tls_cert: str | None = None, tls_key: str | None = None, credential: str | None = None,
            token_file: str | None = None) -> Session:
    """Connect to a kernel at `address` (default: $KERNOS_ADDRESS or 127.0.0.1:7070).

    Without `token`, registers `agent` and receives a new token (`session.token`): the agent's credential for
    good. Keep it: the name stays bound to it after the session ends (exit, idle time, a restart of either
    side), and `connect(agent=..., token=...)` resumes it. Registering an existing name again needs
    `credential`: its token (which it then rotates) or an operator's. Where the kernel's registration policy
    asks for one, `credential` is also the enrollment token (`kernos token create --enroll`) a new name needs.
    `token_file` keeps the token between runs: read if it exists (and resumed), written (mode 0600) when
    the agent registers; a token the kernel no longer knows (another kernel) is replaced by a new registration.
    Waits up to `timeout` seconds for the kernel to be reachable.

    `address` may be "unix:/path/kernos.sock". For a TLS kernel give `tls_ca` (the CA file that signed its
    certificate) and, for mTLS, `tls_cert` / `tls_key` (this client's certificate and key files)."""
    creds = tls_credentials(tls_ca, tls_cert, tls_key)
    channel = (grpc.secure_channel(resolve_address(address), creds, options=CHANNEL_OPTIONS) if creds
               else grpc.insecure_channel(resolve_address(address), options=CHANNEL_OPTIONS))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise Unavailable(f"no kernel answered at {resolve_address(address)} within {timeout} s") from None
    try:
        saved = read_token_file(token_file) if token is None and token_file else None
        if saved is not None:
            try:
                KernelCalls(Executor(channel, auth_metadata(saved))).heartbeat()
                return Session(channel, agent, saved)
            except Unauthenticated:
                pass                     # not known to this kernel (or revoked): register below
        if token is None:
            register = KernelCalls(Executor(channel, auth_metadata(credential) if credential else ()))
            agent_id, token = register._register(agent, description, labels)
            if token_file:
                save_token_file(token_file, token)
            return Session(channel, agent_id, token)
        KernelCalls(Executor(channel, auth_metadata(token))).heartbeat()
        return Session(channel, agent, token)
    except Exception:
        channel.close()
        raise
