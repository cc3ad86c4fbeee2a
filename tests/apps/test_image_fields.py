"""The image fields added for the server applications (Vma.noreserve, Socket.dead_peer,
Socket.listen_lock) pass images/validate.py in a real image, and each, set where it makes
no sense or to a name hpcckpt does not make, is refused naming it."""
import socket
import sys

import pytest

from hpcckpt.errors import ImageError
from hpcckpt.images import pb
from hpcckpt.images.imageset import ImageSet
from hpcckpt.images.validate import validate
from tests.engine.helpers import PROGRAMS, Job, cli


def test_new_fields_bounded(tmp_path):
    job = Job.start([sys.executable, PROGRAMS / "dead_peer.py", 400], tmp_path / "out.txt")
    try:
        job.wait_lines(3)
        cli("dump", "--pid", job.pid, "--images", tmp_path / "img", "--leave-running")
    finally:
        job.kill()
    iset = ImageSet(tmp_path / "img")
    p, pm = iset.process(job.pid), iset.pagemap(job.pid)
    size = (tmp_path / "img" / pm.pages_file).stat().st_size
    validate("img", p, pm, size)
    dead = [f for f in p.fds if f.kind == pb.SOCKET and f.socket.dead_peer]
    assert {f.socket.type for f in dead} == {socket.SOCK_STREAM, socket.SOCK_SEQPACKET}
    assert all(f.socket.queue for f in dead)

    def refused(edit, said: str) -> None:
        bad = type(p)()
        bad.CopyFrom(p)
        edit(bad)
        with pytest.raises(ImageError, match=said):
            validate("img", bad, pm, size)

    def shared_noreserve(x):
        v = next(v for v in x.mm.vmas if v.kind == pb.FILE_PRIVATE)
        v.kind, v.noreserve = pb.FILE_SHARED, True
    refused(shared_noreserve, "MAP_NORESERVE")

    def dead_end_1(x):
        next(f for f in x.fds if f.kind == pb.SOCKET and f.socket.dead_peer).socket.end = 1
    refused(dead_end_1, "closed peer")

    def listener_lock(name: str, listening: bool = True):
        def edit(x):
            f = next(f for f in x.fds if f.kind == pb.SOCKET and f.socket.dead_peer)
            f.socket.Clear()
            f.socket.family, f.socket.type, f.socket.listening = socket.AF_INET, socket.SOCK_STREAM, listening
            f.socket.address, f.socket.port, f.socket.listen_lock = "127.0.0.1", 8080, name
        return edit
    refused(listener_lock("filter"), "listener lock table 'filter'")
    refused(listener_lock("hpcckpt_1_2"), "listener lock table")               # the connection lock's kind
    refused(listener_lock("hpcckptl_1_2", listening=False), "listener lock table")
    good = type(p)()
    good.CopyFrom(p)
    listener_lock("hpcckptl_1_2")(good)
    validate("img", good, pm, size)
