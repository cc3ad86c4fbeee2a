"""Network lock: nftables rules that drop every packet of chosen TCP connections.

While a connection is checkpointed its state must not move: a packet the frozen
process's kernel accepts and acknowledges after we read the queues would be lost, and a
packet arriving after the process is killed, before the restore, would be answered with
a reset. So (as CRIU does) each connection is locked before its state is read: packets of
its 4-tuple, both directions, are dropped on input and output. The peer just sees a lost
packet and retransmits; once the restored connection is in place it is let through and
its next retransmission goes through.

One table per dump, `inet hpcckpt_<dumping pid>_<tree root pid>`, so parallel dumps never
touch each other's rules; it lives in the network namespace of the sockets (found with
SIOCGSKNS on the socket itself). A connection is locked by adding it to the table's
`conns4`/`conns6` set, and let through again by adding it to `open4`/`open6`, whose rule
accepts before the drop rule: nftables commits additions at once, while any deletion
(element, rule, table) waits for an RCU grace period (10-20 ms measured here), so
deleting the table is left to `cleanup`, once the processes run. A dump that ends the
tree leaves its table behind on purpose: the restore lets its connections through and
deletes their elements (the table once empty); the name is in the image.

nftables is driven through libnftables (ctypes, no process started) in our own network
namespace, else by `nsenter --net=... nft -f -` (Debian package nftables).
"""
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field

from ..errors import KernelError

SIOCGSKNS = 0x894C
PREFIX = "hpcckpt_"


def table_name(root_pid: int, prefix: str = PREFIX) -> str:
    """PREFIX<dumping pid>_<tree root pid>: unique per dump (the listener lock has its own
    prefix)."""
    return f"{prefix}{os.getpid()}_{root_pid}"


def valid_name(name: str, prefix: str = PREFIX) -> bool:
    return re.fullmatch(re.escape(prefix) + r"[0-9]{1,10}_[0-9]{1,10}", name) is not None


def _nft_binary() -> str:
    path = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)
    if path is None:
        raise KernelError("the network lock needs nftables' `nft` command, which is not installed "
                          "(Debian: apt-get install nftables)")
    return path


def netns_of(s: socket.socket) -> int:
    """An fd (ours, caller closes) of the network namespace socket `s` lives in."""
    try:
        return fcntl.ioctl(s.fileno(), SIOCGSKNS)
    except OSError as e:
        raise KernelError(f"cannot find the network namespace of a socket (SIOCGSKNS): {e.strerror}") from None


def _same_ns(nsfd: int) -> bool:
    return os.fstat(nsfd).st_ino == os.stat("/proc/self/ns/net").st_ino


class _Lib:
    """libnftables, loaded once; None where it is missing (then the nft command serves)."""
    lib = None
    tried = False

    @classmethod
    def get(cls):
        if not cls.tried:
            cls.tried = True
            try:
                lib = ctypes.CDLL("libnftables.so.1")
                lib.nft_ctx_new.restype = ctypes.c_void_p
                lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
                for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                    getattr(lib, name).argtypes = [ctypes.c_void_p]
                for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
                    getattr(lib, name).argtypes = [ctypes.c_void_p]
                    getattr(lib, name).restype = ctypes.c_char_p
                lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
                lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
                cls.lib = lib
            except (OSError, AttributeError):
                cls.lib = None
        return cls.lib


NFT_CTX_OUTPUT_JSON = 1 << 4


def _run(args: list[str], nsfd: int | None, script: str = "") -> subprocess.CompletedProcess:
    """nft ARGS (`-f -` reads `script`), in the namespace of `nsfd`; like subprocess.run."""
    lib = _Lib.get()
    if lib is not None and (nsfd is None or _same_ns(nsfd)):
        json_out = args[:1] == ["-j"]
        cmd = script if args == ["-f", "-"] else " ".join(args[1:] if json_out else args)
        ctx = lib.nft_ctx_new(0)
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            if json_out:
                lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            rc = lib.nft_run_cmd_from_buffer(ctx, cmd.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        finally:
            lib.nft_ctx_free(ctx)
        return subprocess.CompletedProcess(args, 1 if rc else 0, out, err)
    cmd = [_nft_binary(), *args]
    fds: tuple[int, ...] = ()
    if nsfd is not None and not _same_ns(nsfd):
        cmd = ["nsenter", f"--net=/proc/self/fd/{nsfd}", "--"] + cmd
        fds = (nsfd,)
    return subprocess.run(cmd, input=script, text=True, capture_output=True, pass_fds=fds)


def nft(script: str, nsfd: int | None = None) -> None:
    """Run an nft script, in the namespace of `nsfd` (ours if None or the same)."""
    res = _run(["-f", "-"], nsfd, script)
    if res.returncode != 0:
        raise KernelError(f"nftables refused the network lock ({res.stderr.strip() or res.returncode})")


def _elements(table: str, nsfd: int | None) -> dict[str, set[tuple]] | None:
    """The connections in each set of a lock table; None if there is no such table."""
    res = _run(["-j", "list", "table", "inet", table], nsfd)
    if res.returncode != 0:
        return None
    out: dict[str, set[tuple]] = {name: set() for name in SETS}
    for item in json.loads(res.stdout).get("nftables", []):
        st = item.get("set")
        if st and st.get("name") in out:
            for e in st.get("elem", []):
                a, ap, b, bp = e["concat"]
                out[st["name"]].add((str(ipaddress.ip_address(a)), int(ap), str(ipaddress.ip_address(b)), int(bp)))
    return out


def _addr(family: int, addr: str) -> tuple[str, str]:
    """(nft set, address as that set types it): IPv4-mapped IPv6 peers travel as IPv4."""
    if family == socket.AF_INET6 and addr.startswith("::ffff:") and "." in addr:
        return "conns4", addr[7:]
    return ("conns6" if family == socket.AF_INET6 else "conns4"), addr


def _pairs(family: int, local: tuple, peer: tuple) -> tuple[str, list[tuple]]:
    """(set, both directions of the connection as that set's elements)."""
    kind, la = _addr(family, local[0])
    _, pa = _addr(family, peer[0])
    la, pa = str(ipaddress.ip_address(la)), str(ipaddress.ip_address(pa))
    return kind, [(la, int(local[1]), pa, int(peer[1])), (pa, int(peer[1]), la, int(local[1]))]


def _element(family: int, local: tuple, peer: tuple) -> tuple[str, str]:
    kind, pairs = _pairs(family, local, peer)
    return kind, "{ " + ", ".join(" . ".join(map(str, p)) for p in pairs) + " }"


SETS = ("conns4", "conns6", "open4", "open6")
MARK = 0xC114          # packets a restore forges (kernel/tcpforge.py) pass the lock


def _create(table: str) -> str:
    t = f"inet {table}"
    out = [f"add table {t}"]
    for hook in ("input", "output"):
        out.append(f"add chain {t} {hook} {{ type filter hook {hook} priority -300; policy accept; }}")
    for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        for name in ("conns", "open"):
            out.append(f"add set {t} {name}{v} {{ type {kind} . inet_service . {kind} . inet_service; }}")
    for hook in ("input", "output"):
        out.append(f"add rule {t} {hook} meta mark {MARK:#x} accept")    # tcpforge's segments
        for v, ip in (("4", "ip"), ("6", "ip6")):
            match = f"{ip} saddr . tcp sport . {ip} daddr . tcp dport"
            out.append(f"add rule {t} {hook} {match} @open{v} accept")
            out.append(f"add rule {t} {hook} {match} @conns{v} drop")
    return "\n".join(out) + "\n"


def _open_set(kind: str) -> str:
    return "open" + kind[-1]


def delete_script(table: str) -> str:
    """Deleting a table that may not exist: adding it first makes the pair always succeed."""
    return f"add table inet {table}\ndelete table inet {table}\n"


@dataclass
class NetLock:
    """The lock of one dump: a table per network namespace its connections live in."""
    table: str
    _made: dict[int, int] = field(default_factory=dict)    # netns inode -> our fd of it
    _conns: dict[int, list[tuple[str, str]]] = field(default_factory=dict)   # netns inode -> (set, elements)

    def lock(self, s: socket.socket, family: int, local: tuple, peer: tuple) -> None:
        """Drop every packet of the connection of `s` from now on."""
        nsfd = netns_of(s)
        ino = os.fstat(nsfd).st_ino
        script = ""
        if ino in self._made:
            os.close(nsfd)
            nsfd = self._made[ino]
        else:
            script = _create(self.table)
        kind, elem = _element(family, local, peer)
        try:
            nft(script + f"add element inet {self.table} {kind} {elem}\n", nsfd)
        except BaseException:
            if script:          # one nft transaction: nothing of it was made
                os.close(nsfd)
            raise
        self._made[ino] = nsfd
        self._conns.setdefault(ino, []).append((kind, elem))

    def open(self) -> list[str]:
        """Let every locked connection through again (cheap: additions only); the tables
        stay until `cleanup`. Returns what failed, for a note."""
        failed = []
        for ino, conns in self._conns.items():
            try:
                nft("".join(f"add element inet {self.table} {_open_set(k)} {e}\n" for k, e in conns),
                    self._made[ino])
            except KernelError as e:
                failed.append(f"network lock table inet {self.table} could not be opened: {e}")
        self._conns.clear()
        return failed

    def cleanup(self) -> list[str]:
        """Delete the tables (slow: an RCU grace period); returns what failed, for a note."""
        failed = []
        for ino, nsfd in list(self._made.items()):
            try:
                nft(delete_script(self.table), nsfd)
            except KernelError as e:
                failed.append(f"network lock table inet {self.table} not removed: {e}")
            os.close(nsfd)
            del self._made[ino]
        return failed

    def release(self) -> list[str]:
        """Open and delete at once."""
        return self.open() + self.cleanup()

    def keep(self) -> None:
        """Leave the tables in place (the restore deletes them); forget our namespace fds."""
        for nsfd in self._made.values():
            os.close(nsfd)
        self._made.clear()
        self._conns.clear()


def _check(table: str) -> None:
    if not valid_name(table):
        raise KernelError(f"refusing to touch nftables table {table!r}: not a name hpcckpt makes")


def unlock(table: str, conns: list[tuple[int, tuple, tuple]], nsfd: int) -> None:
    """The restore's half: let the connections `conns` ((family, local, peer), as restored)
    through again, in network namespace `nsfd` (cheap: additions only; `forget` then
    clears them away). Only connections the image restores are touched: an image cannot
    free a connection some other dump holds."""
    _check(table)
    have = _elements(table, nsfd)
    if have is None:
        return
    script = ""
    for family, local, peer in conns:
        kind, pairs = _pairs(family, local, peer)
        mine = [p for p in pairs if p in have[kind]]
        if mine:
            script += (f"add element inet {table} {_open_set(kind)} "
                       f"{{ {', '.join(' . '.join(map(str, p)) for p in mine)} }}\n")
    if script:
        nft(script, nsfd)


def forget(table: str, conns: list[tuple[int, tuple, tuple]], nsfd: int) -> None:
    """After `unlock`, once the processes run: delete the connections' elements from
    both sets, and the table once it locks nothing more."""
    _check(table)
    have = _elements(table, nsfd)
    if have is None:
        return
    script = ""
    for family, local, peer in conns:
        kind, pairs = _pairs(family, local, peer)
        for name in (kind, _open_set(kind)):
            for p in pairs:
                if p in have[name]:
                    script += f"delete element inet {table} {name} {{ {' . '.join(map(str, p))} }}\n"
                    have[name].discard(p)
    if not have["conns4"] and not have["conns6"]:
        script = f"delete table inet {table}\n"
    if script:
        nft(script, nsfd)


def tables() -> list[str]:
    """hpcckpt's lock tables in our namespace (for tests and clean-up)."""
    res = subprocess.run([_nft_binary(), "list", "tables"], capture_output=True, text=True)
    if res.returncode != 0:
        if "Operation not permitted" in res.stderr:
            raise KernelError("listing nftables tables needs CAP_NET_ADMIN") from OSError(errno.EPERM, "")
        return []
    return [line.split()[-1] for line in res.stdout.splitlines() if PREFIX in line]
