"""An agent's calls are served on its home node (a cluster's rendezvous choice, `kernel/cluster/`): one that reaches
another node is forwarded there, so the SDK and every gRPC client need no change and need not know the cluster.
Forwarded, not redirected: a redirect would need every client to follow it, and the node a client knows stays
its one address.

The request goes as it came (its message re-serialised), with the caller's metadata and deadline and a mark that
it was forwarded (a forwarded call is never forwarded again, so two nodes' briefly different views cannot make it
loop); the home node's reply, stream or status comes back unchanged. A home that cannot be reached (its process
died, its lease not yet expired) is passed over, and the call is served here."""
from __future__ import annotations

import asyncio

import grpc

from kernos.proto.v1 import llm_pb2

from ..edge import bearer

FORWARDED = "kernos-forwarded-by"
RESTORE = "/kernos.v1.LLM/Restore"
_NOT_REACHED = ("failed to connect", "Connection refused", "DNS resolution failed", "No route to host")
_HOP_HEADERS = ("user-agent", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout", "te", "content-type")


class Unreachable(Exception):
    """The home node did not answer at all: serve the call here."""


def _serialize(message) -> bytes:
    return message.SerializeToString()


class Forwarder:
    def __init__(self, membership, identify, max_message_bytes: int, handovers: dict | None = None,
                 credentials=None):
        """`handovers`: request id -> a future of its snapshot's id, for the generations a drain hands over
        (the generate use case's `control.handovers`); `credentials`: TLS to the other nodes (None: plaintext)."""
        self.membership, self.identify = membership, identify
        self.credentials = credentials
        self.max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.handovers = handovers if handovers is not None else {}
        self.streams: set[str] = set()      # request ids of the gRPC streams in flight here

    def home_of(self, metadata):
        """The node to forward this call to; None to serve it here (not an agent's call, already forwarded, or
        this node is the agent's home)."""
        if not self.membership.forward:
            return None
        token = None
        for key, value in metadata or ():
            if key == FORWARDED:
                return None
            if key == "authorization":
                token = bearer(value)
        return self.membership.elsewhere(self.identify(token) if token else None)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.max_receive_message_length", self.max_message_bytes),
                       ("grpc.max_send_message_length", self.max_message_bytes)]
            channel = self._channels[address] = (
                grpc.aio.secure_channel(address, self.credentials, options=options) if self.credentials is not None
                else grpc.aio.insecure_channel(address, options=options))
        return channel

    def _metadata(self, context) -> list[tuple[str, str]]:
        md = [(k, v) for k, v in context.invocation_metadata() or ()
              if not k.startswith(":") and k not in _HOP_HEADERS]
        return md + [(FORWARDED, self.membership.node_id)]

    async def _relay(self, e: grpc.aio.AioRpcError, context, started: bool, home) -> None:
        """A home never reached: Unreachable (serve here). A call the home had taken and lost (it died mid-call)
        ends UNAVAILABLE, retryable: running it again here could run its side effects twice."""
        never_reached = any(s in (e.details() or "") for s in _NOT_REACHED)
        if e.code() == grpc.StatusCode.UNAVAILABLE and not started and never_reached:
            self.membership.unreachable(home)
            raise Unreachable from None
        trailing = [(k, v) for k, v in (e.trailing_metadata() or ()) if k == "retry-after-ms"]
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(e.code(), e.details() or "")

    async def unary(self, home, method: str, request, context) -> bytes:
        call = self._channel(home.grpc_address).unary_unary(method, request_serializer=_serialize,
                                                            response_deserializer=None)
        self.membership.forwarded += 1
        try:
            return await call(request, metadata=self._metadata(context), timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            await self._relay(e, context, False, home)

    async def stream(self, home, method: str, request, context):
        call = self._channel(home.grpc_address).unary_stream(method, request_serializer=_serialize,
                                                             response_deserializer=None)
        self.membership.forwarded += 1
        started = False
        try:
            async for chunk in call(request, metadata=self._metadata(context), timeout=context.time_remaining()):
                started = True
                yield chunk
        except grpc.aio.AioRpcError as e:
            await self._relay(e, context, started, home)

    # -- a draining node hands its running streams over ----------------------------------------------------------
    def watch(self, item):
        """Called on each chunk of a stream served here: the first one makes its generation one a drain may hand
        over; the last one, if a drain snapshotted it for that, returns the handover (else None)."""
        if not isinstance(item, llm_pb2.GenerateChunk):
            return None
        if not item.done:
            self.streams.add(item.request_id)
            return None
        self.streams.discard(item.request_id)
        reply = item.reply
        if reply.finish_reason == llm_pb2.FINISH_REASON_SNAPSHOT:
            return self.handovers.pop(reply.request_id, None)
        return None

    def forget(self, item) -> None:
        """A stream served here ended, however it ended: no longer one a drain could hand over."""
        if isinstance(item, llm_pb2.GenerateChunk):
            self.streams.discard(item.request_id)
            self.handovers.pop(item.request_id, None)

    async def continue_elsewhere(self, handover, last, context):
        """Restore the handed-over snapshot on the agent's home node and relay its stream; if there is none
        (no other node, or it cannot be reached), the caller gets the snapshot as it is and can restore it."""
        snapshot_id = await asyncio.wait_for(asyncio.shield(handover), 120)
        home = self.home_of(context.invocation_metadata()) if snapshot_id else None
        if home is not None:
            rest = llm_pb2.GenerateChunk()
            rest.CopyFrom(last)               # the text the snapshot's last chunk flushed, as an ordinary chunk
            rest.done = False
            rest.ClearField("reply")
            flushed = bool(rest.text or rest.tool_calls or rest.logprobs)
            if flushed:
                yield rest
                last = llm_pb2.GenerateChunk(request_id=last.request_id, tokens=last.tokens, done=True,
                                             reply=last.reply, index=last.index)    # (if it must end here)
            try:
                async for chunk in self.stream(home, RESTORE, llm_pb2.RestoreRequest(snapshot_id=snapshot_id),
                                               context):
                    yield chunk
                self.membership.handed_over += 1
                return
            except Unreachable:
                pass
        yield last

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
