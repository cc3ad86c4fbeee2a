"""`hpcckpt show`: an image set decoded for people (text) and tools (JSON)."""
import json

from google.protobuf.json_format import MessageToDict

from . import pb
from .imageset import ImageSet


def _dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True)


def load(path) -> dict:
    iset = ImageSet(path)
    inv = iset.inventory()
    out = {"inventory": _dict(inv), "processes": []}
    for pid in inv.pids:
        p, pm = iset.process(pid), iset.pagemap(pid)
        d = _dict(p)
        for t in d.get("threads", []):
            t.pop("xstate", None)  # kilobytes of vector registers help no reader
            t["regs"] = [f"{int(r):#x}" for r in t.get("regs", [])]
        d["mm"].pop("auxv", None)
        d["pagemap"] = _dict(pm)
        out["processes"].append(d)
    return out


def _tcp(k: pb.Socket) -> str:
    from ..engine.tcp import STATE_NAMES, fmt
    c = k.tcp
    return (f" TCP {fmt((k.address, k.port))} -> {fmt((k.peer_address, k.peer_port))} "
            f"{STATE_NAMES.get(c.state, c.state)}, {len(c.recv_queue)} B unread, {len(c.send_queue)} B "
            f"unacknowledged ({c.unsent} unsent), MSS {c.mss}, lock {c.lock_table or '-'}")


def show(path, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(load(path), indent=1)
    iset = ImageSet(path)
    inv = iset.inventory()
    lines = [f"image set {iset.path}: format {inv.format_version}, hpcckpt {inv.hpcckpt_version}, "
             f"{inv.arch} kernel {inv.kernel} on {inv.host}, uid {inv.uid}"
             + (", own PID namespace" if inv.own_pid_namespace else "")]
    if inv.own_ipc_namespace:
        lines.extend(_ipc_lines(inv.ipc))
    if inv.HasField("netns"):
        lines.extend(_netns_lines(inv.netns))
    for pid in inv.pids:
        p, pm = iset.process(pid), iset.pagemap(pid)
        lines.append(f"process {p.pid} '{p.comm}' ppid {p.ppid} exe {p.mm.exe} cwd {p.cwd}")
        lines.append(f"  threads: {', '.join(str(t.tid) for t in p.threads)}")
        lines.append(f"  pages: {pm.pages_bytes / 2**20:.1f} MiB in {len(pm.runs)} runs ({pm.pages_file})")
        for v in p.mm.vmas:
            saved = sum(r.nr_pages for r in pm.runs if v.start <= r.vaddr < v.end)
            prot = "".join(c if v.prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
            lines.append(f"  {v.start:012x}-{v.end:012x} {prot}{'s' if v.shared else 'p'} "
                         f"{pb.VmaKind.Name(v.kind):12} {saved:7} pages  {v.path}")
        for f in p.fds:
            lines.append(f"  fd {f.fd:3} {pb.FdKind.Name(f.kind):12} {f.path}"
                         + (f" pos {f.pos}" if f.kind == pb.REGULAR else "")
                         + (_tcp(f.socket) if f.kind == pb.SOCKET and f.socket.HasField("tcp") else ""))
        lines.append(f"  signal handlers: {len(p.sigactions)}, pending: {len(p.shared_pending)}")
    for t in inv.ttys:
        lines.append(f"terminal of a shell job, foreground group {t.pgrp or '-'}" if t.external else
                     f"pty /dev/pts/{t.index}: {t.rows}x{t.cols}, session {t.sid or '-'}, foreground "
                     f"{t.pgrp or '-'}, queued {len(t.output)} bytes out, {len(t.input)} in"
                     + (", packet mode" if t.packet_mode else "") + (", locked" if t.locked else ""))
    return "\n".join(lines)


def _netns_lines(net: pb.NetNamespace) -> list[str]:
    out = [f"own network namespace: {len(net.links)} interfaces, {len(net.addresses)} addresses, "
           f"{len(net.routes)} routes, {len(net.rules)} rules"]
    for ln in net.links:
        node = f", node side {ln.peer_name}" + (f" on bridge {ln.peer_master}" if ln.peer_master else "") \
            if ln.kind == "veth" else ""
        addrs = " ".join(f"{a.address}/{a.prefixlen}" for a in net.addresses if a.link == ln.name)
        out.append(f"  {ln.name} ({ln.kind}{', up' if ln.up else ''}, mtu {ln.mtu}{node}) {addrs}")
    for r in net.routes:
        out.append(f"  route {r.dst or 'default'}{'/' + str(r.dst_len) if r.dst else ''}"
                   + (f" via {r.gateway}" if r.gateway else "") + (f" dev {r.link}" if r.link else "")
                   + f" table {r.table}")
    return out


def _ipc_lines(ipc: pb.IpcNamespace) -> list[str]:
    """The job's own IPC namespace: one line per SysV object."""
    out = [f"own IPC namespace: {len(ipc.shm)} shared memory segments, {len(ipc.sem)} semaphore "
           f"sets, {len(ipc.msg)} message queues"]
    for o in ipc.shm:
        out.append(f"  shm {o.perm.id} key {o.perm.key:#x} uid {o.perm.uid} mode {o.perm.mode:o} "
                   f"{o.size} bytes" + (" (removed)" if o.removed else ""))
    for o in ipc.sem:
        out.append(f"  sem {o.perm.id} key {o.perm.key:#x} uid {o.perm.uid} mode {o.perm.mode:o} "
                   f"values {list(o.values)}")
    for o in ipc.msg:
        out.append(f"  msg {o.perm.id} key {o.perm.key:#x} uid {o.perm.uid} mode {o.perm.mode:o} "
                   f"{len(o.messages)} messages, {sum(len(m.data) for m in o.messages)} bytes")
    return out
