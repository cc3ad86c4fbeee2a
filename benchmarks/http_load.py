"""One HTTP client for bench_apps.py: GETs a file back to back and records each request.

    http_load.py PORT PATH SHA256 SECS OUT keepalive|fresh

keepalive: one HTTP/1.1 connection for every request (it must never be re-made); fresh: a
new connection per request (what a listener that is away refuses). Each request's (start,
duration, ok) goes to OUT as three doubles; a request is ok when the whole body arrived
with the right digest. Failed requests are retried on a new connection after a 10 ms
pause (and counted as lost), so a failure does not end the run.
"""
import hashlib
import socket
import struct
import sys
import time


def get(s: socket.socket, path: str, keep: bool) -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed before the headers")
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:"))
    while len(body) < length:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed in the body")
        body += data
    return body


def main() -> None:
    port, path, digest, secs, out, mode = sys.argv[1:7]
    keep = mode == "keepalive"
    end = time.monotonic() + float(secs)
    recs = []
    s = None
    print("started", flush=True)
    while time.monotonic() < end:
        t0 = time.monotonic()
        ok = 1.0
        try:
            if s is None:
                s = socket.create_connection(("127.0.0.1", int(port)), timeout=30)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hashlib.sha256(get(s, path, keep)).hexdigest() != digest:
                ok = 0.0
            if not keep:
                s.close()
                s = None
        except OSError:
            ok = 0.0
            if s is not None:
                s.close()
            s = None
        recs.append((t0, time.monotonic() - t0, ok))
        if not ok:
            time.sleep(0.01)
    with open(out, "wb") as f:
        for r in recs:
            f.write(struct.pack("ddd", *r))


if __name__ == "__main__":
    main()
