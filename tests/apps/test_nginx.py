"""nginx (a master and two workers, the workers as nobody) under `hpcckpt run
--tcp-established`, serving static files to ApacheBench on keep-alive connections, to ApacheBench
making a new connection per request, and to a keep-alive client of the test's own. The job is checkpointed and killed (the final signal)
mid-load and resumed: ab finishes every request with none failed, the test's kept-alive
connection (the same socket) answers again, and every file served is byte for byte the
file on disk, before and after."""
import hashlib
import http.client
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .helpers import RunJob, apt_install, free_port, lock_tables, wait_for

REQUESTS = 30000
FRESH = 6000


@pytest.fixture(scope="module")
def nginx():
    apt_install(["nginx", "apache2-utils", "curl"], ["/usr/sbin/nginx", "ab", "curl"])
    return "/usr/sbin/nginx"


@pytest.fixture
def www():
    """The files served, in a directory the workers (nobody) can read: pytest's tmp_path
    is 0700."""
    d = Path(tempfile.mkdtemp(prefix="apps-www-"))
    d.chmod(0o755)
    rnd = random.Random(8)
    files = {"index.html": b"<html>hpcckpt apps test</html>\n",
             "page.bin": rnd.randbytes(16 << 10),
             "big.bin": rnd.randbytes(3 << 20)}
    for i in range(5):
        files[f"f{i}.txt"] = (f"file {i}\n" * (1000 * (i + 1))).encode()
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).chmod(0o644)
    yield d, files
    shutil.rmtree(d, ignore_errors=True)


def config(tmp_path: Path, www: Path, port: int) -> Path:
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 2;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log {tmp_path}/access.log;
  client_body_temp_path {tmp_path}/body;
  proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fastcgi;
  uwsgi_temp_path {tmp_path}/uwsgi;
  scgi_temp_path {tmp_path}/scgi;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    root {www};
  }}
}}
""")
    return conf


def curl(port: int, name: str) -> bytes:
    return subprocess.run(["curl", "-sf", "--max-time", "60", f"http://127.0.0.1:{port}/{name}"],
                          capture_output=True, check=True).stdout


def test_nginx_under_load_keeps_its_clients(tmp_path, nginx, www):
    root, files = www
    port = free_port()
    conf = config(tmp_path, root, port)
    job = RunJob(tmp_path / "img", [nginx, "-c", conf, "-p", tmp_path, "-e", tmp_path / "error.log"],
                 tmp_path / "run.txt")
    ab = fresh = None
    try:
        job.start()
        wait_for(lambda: subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/index.html"],
                                        capture_output=True).returncode == 0, "nginx to serve", alive=(job.mon,))
        for name, data in files.items():
            assert curl(port, name) == data, name
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        held.request("GET", "/big.bin")
        assert held.getresponse().read() == files["big.bin"]
        sock, local = held.sock, held.sock.getsockname()

        ab = subprocess.Popen(["ab", "-k", "-c", "4", "-n", str(REQUESTS), "-s", "60",
                               f"http://127.0.0.1:{port}/page.bin"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # and a new connection per request: while nginx is away its listener is locked,
        # so their SYNs are retransmitted, not refused (engine/listeners.py)
        fresh = subprocess.Popen(["ab", "-c", "2", "-n", str(FRESH), "-s", "60", f"http://127.0.0.1:{port}/index.html"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        progress = tmp_path / "ab-progress.txt"
        # ab says "Completed N requests" on stderr every tenth of the run
        lines: list[str] = []

        def started(p) -> bool:
            line = p.stderr.readline()
            lines.append(line)
            return "Completed" in line
        wait_for(lambda: started(ab), "ab to get going", timeout=60, alive=(ab, job.mon))
        wait_for(lambda: started(fresh), "ab (new connections) to get going", timeout=60, alive=(fresh, job.mon))
        job.checkpoint_and_stop()
        assert ab.poll() is None and fresh.poll() is None, "ab finished before the checkpoint: the load did not span it"
        assert lock_tables(job.pids[-1]), "no network lock while nginx is away"
        job.resume()

        held.request("GET", "/big.bin")      # the same connection, kept alive across
        assert held.getresponse().read() == files["big.bin"]
        assert held.sock is sock and held.sock.getsockname() == local
        held.request("GET", "/index.html")
        assert held.getresponse().read() == files["index.html"]

        out, err = ab.communicate(timeout=120)
        progress.write_text("".join(lines) + err)
        assert ab.returncode == 0, out + err
        assert f"Complete requests:      {REQUESTS}" in out, out
        assert "Failed requests:        0" in out and "Non-2xx" not in out, out
        assert f"Keep-Alive requests:    {REQUESTS}" in out, out     # no connection had to be made again
        out, err = fresh.communicate(timeout=120)
        assert fresh.returncode == 0, out + err
        assert f"Complete requests:      {FRESH}" in out, out
        assert "Failed requests:        0" in out and "Non-2xx" not in out, out
        for name, data in files.items():
            assert hashlib.sha256(curl(port, name)).digest() == hashlib.sha256(data).digest(), name
        held.close()
        wait_for(lambda: not lock_tables(job.pids[-1]), "the lock to be removed", timeout=10)
    finally:
        for p in (ab, fresh):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        job.stop()
