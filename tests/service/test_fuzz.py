"""Fuzzing the decoders a caller or an image reaches: only clear errors, no crash, no hang.

Bounded example counts keep this to seconds in CI."""
import io
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.client import Client
from hpcckpt.errors import ImageError
from hpcckpt.images import pb
from hpcckpt.images import service_pb2 as spb
from hpcckpt.images.imageset import ImageSet
from hpcckpt.images.validate import validate
from hpcckpt.service import framing
from tests.engine.helpers import Job, cli

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.binary(max_size=2048))
def test_request_decoder(data):
    try:
        framing.decode(spb.Request, data)
    except framing.ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=64))
def test_frame_reader(data):
    try:
        framing.read_frame(io.BytesIO(data).read)
    except framing.ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=4096))
def test_image_message_decoder(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fz")
    (d / "process-1.img").write_bytes(data)
    try:
        ImageSet(d).read_message("process-1.img", "process")
    except ImageError:
        pass


@pytest.fixture(scope="module")
def real_image(tmp_path_factory, threads_fp):
    d = tmp_path_factory.mktemp("realimg")
    job = Job.start([threads_fp, 100, 2, 20], d / "out.txt")
    job.wait_lines(2)
    cli("dump", "--pid", job.pid, "--images", d / "img", "--leave-running")
    job.kill()
    iset = ImageSet(d / "img")
    inv = iset.inventory()
    return iset.process(inv.root_pid), iset.pagemap(inv.root_pid), inv.digests[f"pages-{inv.root_pid}.img"].size


FIELDS = ["vma_start", "vma_end", "run_vaddr", "run_pages", "run_offset", "tid", "regs", "fd", "path", "exe"]


@FUZZ
@given(field=st.sampled_from(FIELDS), index=st.integers(0, 40), value=st.integers(0, 2**64 - 1))
def test_crafted_image_fields_are_validated(real_image, field, index, value):
    """Any single field set to any value: the image is either still sound or refused by name."""
    src_p, src_pm, size = real_image
    p, pm = pb.Process(), pb.Pagemap()
    p.CopyFrom(src_p)
    pm.CopyFrom(src_pm)
    vma = p.mm.vmas[index % len(p.mm.vmas)]
    run = pm.runs[index % len(pm.runs)]
    if field == "vma_start":
        vma.start = value
    elif field == "vma_end":
        vma.end = value
    elif field == "run_vaddr":
        run.vaddr = value
    elif field == "run_pages":
        run.nr_pages = value
    elif field == "run_offset":
        run.offset = value
    elif field == "tid":
        p.threads[index % len(p.threads)].tid = value % 2**32
    elif field == "regs":
        del p.threads[0].regs[value % 27:]
    elif field == "fd":
        p.fds[index % len(p.fds)].fd = value % 2**32
    elif field == "path":
        p.fds[index % len(p.fds)].path = "relative/" + str(value)
    else:
        p.mm.exe = str(value)
    try:
        validate("fuzzed", p, pm, size)
    except ImageError as e:
        assert "image fuzzed is invalid" in str(e)


def test_daemon_survives_garbage(daemon):
    proc, sock = daemon
    import random
    rng = random.Random(1)
    for i in range(200):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock)
            kind = i % 4
            if kind == 0:
                s.sendall(rng.randbytes(rng.randrange(1, 64)))
            elif kind == 1:
                s.sendall(struct.pack("<I", 0xFFFFFFF0))            # absurd length
            elif kind == 2:
                payload = rng.randbytes(rng.randrange(0, 200))
                s.sendall(struct.pack("<I", len(payload)) + payload)
            else:
                s.sendall(framing.encode(spb.Request(version=99, status=spb.StatusRequest())))
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    assert proc.poll() is None
    assert Client(sock).status().ok


def _in_flight(p: pb.Process, message: int, path: str, flags: int = 0) -> None:
    """fd 0 made a unix socket with one queued message and a file passed with message `message`."""
    f = p.fds[0]
    f.kind = pb.SOCKET
    f.socket.family, f.socket.type = 1, 1
    f.socket.queue.append(b"x")
    f.socket.in_flight.add(message=message).files.add(path=path, flags=flags)


@pytest.mark.parametrize("craft, message", [
    (lambda p, pm: _in_flight(p, 0, "etc/shadow"), "passed file 'etc/shadow'"),
    (lambda p, pm: _in_flight(p, 0, "/etc/motd", 0o1101), "passed file '/etc/motd'"),
    (lambda p, pm: _in_flight(p, 3, "/etc/motd"), "passed file.* on message 3 of 1"),
    (lambda p, pm: setattr(p.mm.vmas[0], "start", 0xFFFF888000000000), "not page-aligned or is empty"),
    (lambda p, pm: setattr(p.mm.vmas[1], "end", 0xFFFF888000000000), "outside user space"),
    (lambda p, pm: setattr(p.mm.vmas[2], "start", p.mm.vmas[1].start), "overlaps"),
    (lambda p, pm: setattr(pm.runs[0], "offset", 1 << 40), "beyond the page file"),
    (lambda p, pm: setattr(pm.runs[0], "vaddr", 0x1000), "not inside a mapping"),
    (lambda p, pm: setattr(p.fds[0], "data_file", "../../etc/shadow"), "outside the image"),
    (lambda p, pm: setattr(p.mm, "exe", "bin/sh"), "not an absolute path"),
])
def test_crafted_images_are_refused_by_name(real_image, craft, message):
    src_p, src_pm, size = real_image
    p, pm = pb.Process(), pb.Pagemap()
    p.CopyFrom(src_p)
    pm.CopyFrom(src_pm)
    craft(p, pm)
    with pytest.raises(ImageError, match=message):
        validate("crafted", p, pm, size)


def _flight_object(p: pb.Process, kind: int, **fields) -> pb.Fd:
    """fd 0 made a unix socket whose one queued message carries an in-flight object."""
    _in_flight(p, 0, "/etc/motd")
    pf = p.fds[0].socket.in_flight[0].files[0]
    pf.path = ""
    pf.object.kind, pf.object.file_id = kind, 900
    for k, v in fields.items():
        setattr(pf.object, k, v)
    return pf.object


def _nested(p: pb.Process) -> None:
    o = _flight_object(p, pb.SOCKET)
    o.socket.family, o.socket.type = 1, 1
    o.socket.queue.append(b"y")
    o.socket.in_flight.add(message=0).files.add(path="/etc/motd")


def _both(p: pb.Process) -> None:
    _flight_object(p, pb.PIPE, pipe_id=5)
    p.fds[0].socket.in_flight[0].files[0].file_id = 3


def _pair_name(p: pb.Process) -> None:
    f = p.fds[0]
    f.kind = pb.SOCKET
    f.socket.family, f.socket.type, f.socket.pair_id, f.socket.accepted = 1, 1, 7, True
    f.socket.address = "relative.sock"


@pytest.mark.parametrize("craft, message", [
    (lambda p: _flight_object(p, pb.REGULAR, path="/etc/shadow"), "only unix sockets .* and pipes may be in flight"),
    (_nested, "only unix sockets \\(not carrying passed fds\\)"),
    (_both, "has a path and a file id, or two file ids"),
    (lambda p: _flight_object(p, pb.PIPE, path="pipe:[5]", pipe_id=5, pipe_size=1 << 31), "pipe 5 with 0 bytes"),
    (lambda p: _flight_object(p, pb.PIPE, path="pipe:[5]", pipe_id=5, data_file="../x"), "fields no socket or pipe has"),
    (_pair_name, "unix socket name 'relative.sock'"),
    (lambda p: _flight_object(p, pb.PIPE, path="fifo", pipe_id=5), "pipe or FIFO path 'fifo'"),
])
def test_crafted_in_flight_objects_are_refused(real_image, craft, message):
    """Sockets and pipes in flight, and unix pair names (engine/sockets.py): refused by name."""
    src_p, src_pm, size = real_image
    p, pm = pb.Process(), pb.Pagemap()
    p.CopyFrom(src_p)
    pm.CopyFrom(src_pm)
    craft(p)
    with pytest.raises(ImageError, match=message):
        validate("crafted", p, pm, size)


def test_in_flight_file_ids_must_exist():
    from hpcckpt.images.validate import validate_in_flight
    p = pb.Process(pid=5)
    f = p.fds.add(fd=3, kind=pb.SOCKET, file_id=1)
    f.socket.family, f.socket.type = 1, 1
    f.socket.queue.append(b"x")
    f.socket.in_flight.add(message=0).files.add(file_id=99)
    with pytest.raises(ImageError, match="process 5 fd 3 passes file id 99 in flight, which no fd"):
        validate_in_flight("crafted", [p])
    f.socket.in_flight[0].files[0].file_id = 1          # its own description: fine
    validate_in_flight("crafted", [p])
    o = f.socket.in_flight[0].files.add().object
    o.kind, o.file_id, o.pipe_id = pb.PIPE, 1, 9          # an object reusing an fd's id
    with pytest.raises(ImageError, match="in-flight object with file id 1, which another"):
        validate_in_flight("crafted", [p])
