"""A real S3 endpoint over HTTP on 127.0.0.1: moto's server mode in a subprocess."""
import os
import socket
import subprocess
import sys
import time

import pytest

from longctx.launch.local import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto(env=None):
    """A moto server on a free port of 127.0.0.1, once it accepts connections: (process, endpoint URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """Starts moto_server, points the AWS env (and so Ray workers started later) at it."""
    proc, url = start_moto()
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "S3_ENDPOINT_URL"]}
    os.environ.update(CREDENTIALS, S3_ENDPOINT_URL=url)
    yield url
    proc.terminate()
    proc.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_bucket(name: str):
    import boto3
    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=name)
    return client


class Outage:
    """A TCP relay in front of the S3 server that can go down (new connections refused, open ones cut) and
    come back on the same port: a storage outage as clients see it, with the server's data kept."""

    def __init__(self, target_url: str):
        import threading
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock, self.open, self.server = threading.Lock(), [], None
        self.up()

    def up(self):
        import threading
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.settimeout(0.1)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self):
        server, self.server = self.server, None
        server.close()
        with self.lock:
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def _accept(self, server):
        import threading
        while self.server is server:
            try:
                client, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
