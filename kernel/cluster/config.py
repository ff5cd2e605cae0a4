"""`[cluster]`: the shared backends of several kernels, and this kernel's place among them."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from pydantic import Field, field_validator

from ..llm.settings import _Strict


class ClusterConfig(_Strict):
    database: str = Field("", description="postgresql://user:password@host:port/db: every store's tables there, "
                                          "one schema each, shared by the kernels of a cluster; empty: SQLite "
                                          "files under data_dir (one machine)")
    objects: str = Field("", description="s3://bucket/prefix: file contents in an S3-compatible object store; "
                                         "empty: folders under data_dir")
    s3_endpoint: str = Field("", description="the object store's URL (empty: AWS); credentials from "
                                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    s3_region: str = "us-east-1"
    node_id: str = Field("", description="this kernel's name in the cluster; empty: the host name and a hash of "
                                         "data_dir (stable across restarts)")
    advertise: str = Field("", description="host:port the other nodes reach this one's gRPC on (its HTTP "
                                           "on the same host); empty: the addresses it listens on (0.0.0.0 "
                                           "replaced by the host name)")
    lease_s: float = Field(10.0, gt=0, description="a node that has not renewed its lease for this long is dead "
                                                   "to the others; its agents get new home nodes")
    heartbeat_s: float = Field(2.0, gt=0, description="how often a node renews its lease and reads the others'")
    forward: bool = Field(True, description="serve an agent's calls on its home node: a call that reaches another "
                                            "node is forwarded there")
    tls_ca: Path | None = Field(None, description="CA (PEM) that signed the other nodes' server certificates: with "
                                                  "server.tls_cert set, calls between nodes use TLS, this node's "
                                                  "certificate as its client certificate (for nodes that ask mTLS)")

    @field_validator("database")
    @classmethod
    def _pg(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return v

    @field_validator("objects")
    @classmethod
    def _s3(cls, v: str) -> str:
        if v and (not v.startswith("s3://") or not v[5:].split("/")[0]):
            raise ValueError("must be s3://bucket or s3://bucket/prefix")
        return v

    @field_validator("tls_ca")
    @classmethod
    def _ca(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no such file: {v}")
        return v

    @field_validator("node_id")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and (len(v) > 64 or not all(c.isalnum() or c in "-_.:" for c in v)):
            raise ValueError("1-64 characters of letters, digits, '-', '_', '.', ':'")
        return v

    def blobs(self, kind: str):
        """The object store's part for `kind` ("files", "adapters", "snapshots", "jobs"); None without one."""
        if not self.objects:
            return None
        from kernos.storage.blobs import S3Blobs

        return S3Blobs(f"{self.objects.rstrip('/')}/{kind}", self.s3_endpoint, self.s3_region)

    def name(self, data_dir: Path) -> str:
        return self.node_id or f"{socket.gethostname()[:40]}-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]}"

    def reach(self, listening: str, http: bool = False) -> str:
        """How other nodes reach an address this node listens on: gRPC's is `advertise` when set, HTTP's the
        advertised host with the HTTP port; an address on every interface is the host name's."""
        host, _, port = listening.rpartition(":")
        if self.advertise:
            return f"{self.advertise.rpartition(':')[0]}:{port}" if http else self.advertise
        return f"{socket.gethostname()}:{port}" if host in ("0.0.0.0", "[::]", "") else listening
