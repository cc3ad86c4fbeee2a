"""A job's own network namespace: saved with its interfaces, addresses, routes and rules,
and made anew from the image on restore, here or on another node (as CRIU's net.c does).

Why: a server's address belongs to the namespace it runs in. When the job's namespace
(and the veth that joins it to the node) moves with it, its address, and so its TCP
connections, move too; the node only has to put the node side of the veth where the
address is reachable (a bridge per node, joined across nodes: docs/architecture.md).

Dump (`save`, with --netns): every process of the tree in one namespace, not hpcckpt's
own and holding no other process. Interfaces: loopback, and veth whose other end
is on the node (in the dumper's namespace: its name, MAC, MTU and the bridge it is a port
of are saved, as CRIU's --external veth[...] names them). What the kernel makes by
itself is left out: prefix routes of addresses, the local table, cached routes, IPv6
link-local addresses; rules are all saved, and those a fresh namespace has are skipped on
restore. Not saved: sysctls, neighbour entries, the namespace's own nftables rules.
When the dump ends the tree, the node side of each veth is deleted (the namespace dies
with the tree): the address is gone from this node, so a restore may bring it back here
or elsewhere under the same names.

Restore (`Restoring`): checks first (root only; each node-side name free, each bridge a
bridge), then the restore process unshares a new namespace (this thread: the stubs it
clones are born in it), builds it, and every interface is up except the node sides of
the veths, which are made down and attached to their bridges: nothing reaches the job
until its TCP connections are out of repair mode (`connect`, just before it runs), when
they come up and each address is announced (gratuitous ARP, unsolicited neighbour
advertisement) so bridges and neighbours learn where it is now. The restore process
then goes back to its own namespace: the job's lives as long as the job.
"""
import ctypes
import errno
import os
import socket
import time
from dataclasses import dataclass, field

from ..errors import HpcckptError, KernelError, PermissionDeniedError, RestoreError, UnsupportedError
from ..images import pb
from ..images.validate import IFNAME
from ..kernel import rtnl
from ..kernel.libc import libc

KINDS = ("loopback", "veth")
RTM_F_CLONED = 0x200
RTAX_MTU = 2
GONE_WAIT = 5.0        # seconds a restore waits for a dying namespace's veth name to free


def ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _check_tree(root: int, pids: list[int]) -> int:
    """The inode of the tree's own network namespace, or a clear refusal."""
    ino = ns_inode(root)
    for p in pids:
        if ns_inode(p) != ino:
            raise UnsupportedError(f"process {p} runs in another network namespace than process {root}: "
                                   "--netns needs the whole tree in one namespace")
    if ino == os.stat("/proc/self/ns/net").st_ino:
        raise UnsupportedError(f"process {root} runs in hpcckpt's own network namespace (the node's): "
                               "--netns checkpoints a namespace of the job's own; start the job in one "
                               "(docs/architecture.md, Network namespaces)")
    tree = set(pids)
    others = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(name) not in tree and ns_inode(int(name)) == ino:
                others.append(name)
        except OSError:
            continue
    if others:
        raise UnsupportedError(f"the network namespace of process {root} also holds process(es) "
                               f"{', '.join(others[:5])}, outside the tree: it is not the job's own; "
                               "checkpoint without --netns, or with those processes in the tree")
    return ino


def _name(links: dict[int, str], index: int | None) -> str:
    return links.get(index, "") if index else ""


def save(root: int, pids: list[int]) -> pb.NetNamespace:
    """The network namespace of the frozen tree `pids` (host PIDs, `root` first)."""
    _check_tree(root, pids)
    nsfd = os.open(f"/proc/{root}/ns/net", os.O_RDONLY)
    inside = outside = None
    try:
        inside = rtnl.ipr(nsfd, f"the network namespace of process {root}")
        outside = rtnl.ipr()
        net = pb.NetNamespace()
        names = _links(net, inside, outside, root)
        _addresses(net, inside, names)
        _routes(net, inside, names)
        _rules(net, inside)
        return net
    except KernelError:
        raise
    except rtnl.errors() as e:
        raise KernelError(f"cannot read the network namespace of process {root}: {e}") from None
    finally:
        for r in (inside, outside):
            if r is not None:
                r.close()
        os.close(nsfd)


def _kind(link) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    return "loopback" if link["ifi_type"] == rtnl.ARPHRD_LOOPBACK else (kind or "?")


def _links(net: pb.NetNamespace, inside, outside, root: int) -> dict[int, str]:
    names = {}
    node = {ln["index"]: ln for ln in outside.get_links()}
    for ln in inside.get_links():
        name, kind = ln.get_attr("IFLA_IFNAME"), _kind(ln)
        names[ln["index"]] = name
        where = f"process {root}'s network namespace: interface {name}"
        if kind not in KINDS:
            raise UnsupportedError(f"{where} is a {kind} interface; only loopback and veth "
                                   "interfaces can be checkpointed")
        link = pb.NetLink(name=name, kind=kind, mtu=rtnl.attr(ln, "IFLA_MTU", 0),
                          up=bool(ln["flags"] & rtnl.IFF_UP))
        if kind != "loopback":
            link.mac = rtnl.mac_bytes(ln.get_attr("IFLA_ADDRESS"))
        if kind == "veth":
            peer = node.get(ln.get_attr("IFLA_LINK"))
            if ln.get_attr("IFLA_LINK_NETNSID") is None or peer is None or _kind(peer) != "veth" \
                    or peer.get_attr("IFLA_LINK") != ln["index"]:
                raise UnsupportedError(f"{where} is a veth whose other end is not in hpcckpt's network "
                                       "namespace: dump from the namespace holding it (the node's)")
            link.peer_name = peer.get_attr("IFLA_IFNAME")
            link.peer_mac = rtnl.mac_bytes(peer.get_attr("IFLA_ADDRESS"))
            link.peer_mtu = rtnl.attr(peer, "IFLA_MTU", 0)
            master = peer.get_attr("IFLA_MASTER")
            if master:
                link.peer_master = node[master].get_attr("IFLA_IFNAME") if master in node else ""
        net.links.append(link)
    return names


def _addresses(net: pb.NetNamespace, inside, names: dict[int, str]) -> None:
    for a in inside.get_addr():
        v6 = a["family"] == socket.AF_INET6
        if v6 and a["scope"] == 253:      # link-local: the kernel makes it from the MAC
            continue
        local = a.get_attr("IFA_LOCAL") if not v6 else None
        addr = a.get_attr("IFA_ADDRESS")
        x = pb.NetAddress(link=_name(names, a["index"]), v6=v6, prefixlen=a["prefixlen"], scope=a["scope"],
                          flags=rtnl.attr(a, "IFA_FLAGS", a["flags"]))
        x.address = local or addr
        if local and addr and addr != local:
            x.peer = addr
        x.broadcast = rtnl.attr(a, "IFA_BROADCAST", "")
        label = rtnl.attr(a, "IFA_LABEL", "")
        x.label = "" if label == x.link else label
        net.addresses.append(x)


def _routes(net: pb.NetNamespace, inside, names: dict[int, str]) -> None:
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in inside.get_routes(family=fam):
            table = rtnl.attr(r, "RTA_TABLE", r["table"])
            if table == rtnl.RT_TABLE_LOCAL or r["proto"] == rtnl.RTPROT_KERNEL or r["flags"] & RTM_F_CLONED \
                    or r["type"] in (rtnl.RTN_LOCAL, rtnl.RTN_BROADCAST, rtnl.RTN_MULTICAST, rtnl.RTN_ANYCAST):
                continue
            if r.get_attr("RTA_MULTIPATH"):
                raise UnsupportedError(f"a multipath route to {r.get_attr('RTA_DST') or 'default'} in the job's "
                                       "network namespace cannot be checkpointed yet")
            x = pb.NetRoute(v6=fam == socket.AF_INET6, table=table, dst=rtnl.attr(r, "RTA_DST", ""),
                            dst_len=r["dst_len"], gateway=rtnl.attr(r, "RTA_GATEWAY", ""),
                            link=_name(names, r.get_attr("RTA_OIF")), prefsrc=rtnl.attr(r, "RTA_PREFSRC", ""),
                            priority=rtnl.attr(r, "RTA_PRIORITY", 0), scope=r["scope"], protocol=r["proto"],
                            type=r["type"])
            metrics = r.get_attr("RTA_METRICS")
            if metrics:
                x.mtu = rtnl.attr(metrics, "RTAX_MTU", 0)
            net.routes.append(x)


def _rules(net: pb.NetNamespace, inside) -> None:
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in inside.get_rules(family=fam):
            net.rules.append(pb.NetRule(
                v6=fam == socket.AF_INET6, priority=rtnl.attr(r, "FRA_PRIORITY", 0),
                table=rtnl.attr(r, "FRA_TABLE", r["table"]), action=r["action"],
                src=rtnl.attr(r, "FRA_SRC", ""), src_len=r["src_len"], dst=rtnl.attr(r, "FRA_DST", ""),
                dst_len=r["dst_len"], fwmark=rtnl.attr(r, "FRA_FWMARK", 0), fwmask=rtnl.attr(r, "FRA_FWMASK", 0),
                iif=rtnl.attr(r, "FRA_IIFNAME", ""), oif=rtnl.attr(r, "FRA_OIFNAME", ""), tos=r["tos"],
                flags=r["flags"]))


def held_by_mount(ino: int) -> str | None:
    """Where network namespace `ino` is bind-mounted (/run/netns/NAME: a namespace the site
    manages, which outlives the job), None if nowhere we can see."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[3] == f"net:[{ino}]":
                    return fields[4]
    except OSError:
        pass
    return None


def detach(net: pb.NetNamespace, ino: int | None = None) -> list[str]:
    """The tree is dead: delete the node side of its veths (and so the pairs), so its
    addresses are gone from this node at once. With `ino` given, a namespace the site keeps
    (bind-mounted) is left as it is: the site's, for a rerun here (`run --netns`) or its
    epilog. Returns notes."""
    if ino is not None and (mount := held_by_mount(ino)):
        return [f"the job's network namespace stays ({mount}), with its interfaces and addresses"]
    notes = []
    ipr = rtnl.ipr()
    try:
        for ln in net.links:
            if ln.kind != "veth" or not ln.peer_name:
                continue
            try:
                idx = ipr.link_lookup(ifname=ln.peer_name)
                if idx:
                    master = ipr.get_links(idx[0])[0].get_attr("IFLA_MASTER")
                    if master:
                        pin_bridge_mac(ipr, master)
                    ipr.link("del", index=idx[0])
            except rtnl.errors() as e:
                notes.append(f"the job's veth {ln.peer_name} could not be removed from this node: {e}")
    finally:
        ipr.close()
    return notes


def pin_bridge_mac(ipr, bridge: int) -> None:
    """Set a bridge's MAC to the one it has. A bridge whose MAC was never set takes the
    lowest of its ports': adding the job's veth (a random MAC) or deleting it could change
    the MAC of the node's own address on that bridge, and every neighbour's cache of it goes
    stale: the node's connections (a migration's own) stall until ARP finds it again. Once
    set, it stays."""
    mac = ipr.get_links(bridge)[0].get_attr("IFLA_ADDRESS")
    if mac:
        ipr.link("set", index=bridge, address=mac)


# -- restore ----------------------------------------------------------------------------

def parse_veth(specs: list[str] | None) -> dict[str, tuple[str, str]]:
    """`--veth INSIDE=OUTSIDE[@BRIDGE]` (CRIU's --external veth[INSIDE]:OUTSIDE@BRIDGE):
    the node side of the job's veth INSIDE is made as OUTSIDE, a port of BRIDGE ("" none)."""
    out = {}
    for s in specs or ():
        inside, eq, rest = s.partition("=")
        outside, _, bridge = rest.partition("@")
        if not eq or not all(IFNAME.match(x) for x in (inside, outside, bridge or "x")):
            raise HpcckptError(f"--veth {s!r}: give INSIDE=OUTSIDE or INSIDE=OUTSIDE@BRIDGE, interface "
                               "names of at most 15 characters")
        out[inside] = (outside, bridge)
    return out


@dataclass
class Restoring:
    """A restore's new network namespace, from `check` (nothing touched) to `leave`."""
    net: pb.NetNamespace
    where: str
    veth: dict[str, tuple[str, str]] = field(default_factory=dict)
    join: str | None = None      # an existing namespace to restore into, as it is
    home: int = -1
    node = None            # IPRoute in the node's (our original) namespace
    inside = None          # IPRoute in the new one
    made: list[str] = field(default_factory=list)      # node-side names we created

    def node_side(self, ln: pb.NetLink) -> tuple[str, str]:
        return self.veth.get(ln.name, (ln.peer_name, ln.peer_master))

    def check(self) -> None:
        if os.geteuid() != 0:
            raise PermissionDeniedError(f"{self.where}: the image holds the job's network namespace, "
                                        "which only root (or hpcckptd) may create")
        if self.join:
            try:
                fd = os.open(self.join, os.O_RDONLY)
            except OSError as e:
                raise RestoreError(f"network namespace {self.join}: {e.strerror}") from None
            os.close(fd)
            return
        unknown = set(self.veth) - {ln.name for ln in self.net.links if ln.kind == "veth"}
        if unknown:
            raise RestoreError(f"--veth names {', '.join(sorted(unknown))}, which the image's network "
                               f"namespace has no veth of (it has: "
                               f"{', '.join(ln.name for ln in self.net.links if ln.kind == 'veth') or 'none'})")
        ipr = rtnl.ipr()
        try:
            for ln in self.net.links:
                if ln.kind != "veth":
                    continue
                out, bridge = self.node_side(ln)
                deadline = time.monotonic() + GONE_WAIT
                while ipr.link_lookup(ifname=out):      # the dumped namespace may still be dying
                    if time.monotonic() > deadline:
                        raise RestoreError(f"{self.where}: interface {out} (the node side of the job's veth "
                                           f"{ln.name}) already exists on this node: is the checkpointed job "
                                           f"still running? Remove it, or restore with --veth {ln.name}=OTHERNAME")
                    time.sleep(0.02)
                if bridge:
                    idx = ipr.link_lookup(ifname=bridge)
                    if not idx or _kind(ipr.get_links(idx[0])[0]) != "bridge":
                        raise RestoreError(f"{self.where}: the job's veth {ln.name} was attached to bridge "
                                           f"{bridge}, which this node does not have: create it, or restore "
                                           f"with --veth {ln.name}=NAME@BRIDGE")
        finally:
            ipr.close()

    def enter(self) -> None:
        """The calling thread (and every process it forks from now on) in a new network
        namespace, built from the image; node sides of veths down."""
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if self.join:
            fd = os.open(self.join, os.O_RDONLY)
            try:
                rtnl._setns(fd, f"network namespace {self.join}")
            finally:
                os.close(fd)
            return
        self.node = rtnl.ipr()
        if libc.unshare(rtnl.CLONE_NEWNET) != 0:
            raise KernelError(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")
        self.inside = rtnl.ipr()
        try:
            self._build()
        except rtnl.errors() as e:
            raise RestoreError(f"{self.where}: cannot rebuild the job's network namespace: {e}") from None

    def _build(self) -> None:
        ins, by_name = self.inside, {}
        for ln in self.net.links:
            if ln.kind == "veth":
                out, bridge = self.node_side(ln)
                ins.link("add", ifname=ln.name, kind="veth",
                         peer={"ifname": out, "net_ns_fd": self.home})
                self.made.append(out)
                idx = self.node.link_lookup(ifname=out)[0]
                # the node side gets a MAC of its own, not the image's: while the source
                # node still holds the old pair (a migration), the same MAC on both ends of
                # one segment (perhaps also the source bridge's own, a bridge taking its
                # lowest port's) makes each bridge keep the other's frames as local
                kw = {}
                if ln.peer_mtu:
                    kw["mtu"] = ln.peer_mtu
                if bridge:
                    kw["master"] = self.node.link_lookup(ifname=bridge)[0]
                    pin_bridge_mac(self.node, kw["master"])
                if kw:
                    self.node.link("set", index=idx, **kw)
            idx = ins.link_lookup(ifname=ln.name)[0]
            by_name[ln.name] = idx
            kw = {"mtu": ln.mtu} if ln.mtu else {}
            if len(ln.mac) == 6:
                kw["address"] = rtnl.mac_text(ln.mac)
            if kw:
                ins.link("set", index=idx, **kw)
            if ln.up:
                ins.link("set", index=idx, state="up")
        for a in self.net.addresses:
            kw = {"index": by_name[a.link], "address": a.address, "prefixlen": a.prefixlen,
                  "family": socket.AF_INET6 if a.v6 else socket.AF_INET, "scope": a.scope}
            if a.peer:
                kw["local"], kw["address"] = a.address, a.peer
            if a.broadcast:
                kw["broadcast"] = a.broadcast
            if a.label:
                kw["label"] = a.label
            # no duplicate address detection: the address is the job's, and must serve at once
            kw["IFA_FLAGS"] = (a.flags & ~rtnl.IFA_F_KERNEL | (rtnl.IFA_F_NODAD if a.v6 else 0))
            _ok_if_there(lambda: ins.addr("add", **kw))
        for r in self.net.routes:
            kw = {"family": socket.AF_INET6 if r.v6 else socket.AF_INET, "table": r.table,
                  "dst_len": r.dst_len, "scope": r.scope, "proto": r.protocol, "type": r.type}
            if r.dst:
                kw["dst"] = r.dst
            if r.gateway:
                kw["gateway"] = r.gateway
            if r.link:
                kw["oif"] = by_name[r.link]
            if r.prefsrc:
                kw["prefsrc"] = r.prefsrc
            if r.priority:
                kw["priority"] = r.priority
            if r.mtu:
                kw["metrics"] = {"attrs": [("RTAX_MTU", r.mtu)]}
            _ok_if_there(lambda: ins.route("add", **kw))
        have = {_rule_key(x) for fam in (socket.AF_INET, socket.AF_INET6) for x in _fresh_rules(ins, fam)}
        for r in self.net.rules:
            if _rule_key(r) in have:
                continue
            kw = {"family": socket.AF_INET6 if r.v6 else socket.AF_INET, "priority": r.priority,
                  "table": r.table, "action": r.action, "src_len": r.src_len, "dst_len": r.dst_len,
                  "tos": r.tos, "flags": r.flags}
            for key, val in (("src", r.src), ("dst", r.dst), ("fwmark", r.fwmark), ("fwmask", r.fwmask),
                             ("iifname", r.iif), ("oifname", r.oif)):
                if val:
                    kw[key] = val
            ins.rule("add", **kw)

    def connect(self) -> None:
        """The job is complete: the node sides of its veths come up (attached to their
        bridges), and its addresses are announced there."""
        if self.join:
            return
        try:
            for ln in self.net.links:
                if ln.kind == "veth" and ln.up:
                    out, _ = self.node_side(ln)
                    self.node.link("set", index=self.node.link_lookup(ifname=out)[0], state="up")
            self._announce()
        except rtnl.errors() as e:
            raise RestoreError(f"{self.where}: cannot connect the job's network namespace to the node: {e}") from None

    def _announce(self) -> None:
        veths = {ln.name: ln for ln in self.net.links if ln.kind == "veth" and ln.up}
        deadline = time.monotonic() + 2
        for name in veths:     # carrier: the node side is up at the other end of the pair
            idx = self.inside.link_lookup(ifname=name)[0]
            while self.inside.get_links(idx)[0].get_attr("IFLA_CARRIER") != 1 and time.monotonic() < deadline:
                time.sleep(0.002)
        for a in self.net.addresses:
            ln = veths.get(a.link)
            if ln is None or len(ln.mac) != 6:
                continue
            idx = self.inside.link_lookup(ifname=ln.name)[0]
            try:
                if a.v6:
                    rtnl.unsolicited_na(idx, ln.mac, a.address)
                else:
                    rtnl.gratuitous_arp(idx, ln.mac, a.address)
            except OSError:
                pass        # an announcement is a speed-up: neighbours find the address anyway

    def leave(self) -> None:
        """Back to our own namespace (the job keeps its own alive)."""
        for r in (self.inside, self.node):
            if r is not None:
                r.close()
        self.inside = self.node = None
        if self.home >= 0:
            try:
                rtnl._setns(self.home, "our own network namespace again")
            finally:
                os.close(self.home)
                self.home = -1

    def abort(self) -> None:
        """The restore failed: the node sides we made go (and so their pairs)."""
        try:
            for out in self.made:
                idx = self.node.link_lookup(ifname=out) if self.node else []
                if idx:
                    self.node.link("del", index=idx[0])
        except rtnl.errors():
            pass
        finally:
            self.leave()


def _ok_if_there(fn) -> None:
    """Add something the kernel may have made already (lo's addresses once it is up)."""
    try:
        fn()
    except rtnl.errors() as e:
        if rtnl.errno_of(e) != errno.EEXIST:
            raise


def _fresh_rules(ipr, fam: int) -> list[pb.NetRule]:
    return [pb.NetRule(v6=fam == socket.AF_INET6, priority=rtnl.attr(r, "FRA_PRIORITY", 0),
                       table=rtnl.attr(r, "FRA_TABLE", r["table"]), action=r["action"])
            for r in ipr.get_rules(family=fam)]


def _rule_key(r: pb.NetRule) -> tuple:
    return (r.v6, r.priority, r.table, r.action, r.src, r.src_len, r.dst, r.dst_len, r.fwmark, r.fwmask,
            r.iif, r.oif, r.tos, r.flags)

