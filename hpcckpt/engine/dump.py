"""Dump a process tree (every process with all its threads) to an image set.

Order matters for the promises we make: everything that can refuse (unsupported fds,
mappings, timers) is looked at while the process is frozen but before anything is
written; any failure thaws the process exactly as it was and removes the partial image;
without --leave-running the process is killed only after the image is sealed on disk.
"""
import dataclasses
import functools
import gc
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import HpcckptError, KernelError, PermissionDeniedError, ProcessGoneError, UnsupportedError
from ..images import pb
from ..images.imageset import ImageSet
from ..kernel import elf, proc, vdso
from ..kernel.inject import _alive
from ..progress import Progress
from ..images.chain import load_chain, new_image_id, relative_parent
from ..tracking.incremental import IncrementalPlan, plan_incremental
from ..tracking.hashing import HashingTracker
from ..tracking.uffd_wp import UffdWpTracker
from . import files, listeners, memory, sessions, shared, snapshot, streamdump, sysvipc, tcp, ttys
from .capture import ShmemTable, capture_tree
from .precopy import PreCopy
from .wpsnapshot import SnapshotLostError, WpSnapshot
from .incremental import Parent, TreeTracker, collect_held, hand_off, save_digests
from . import tree as ptree
from .freeze import Frozen
from .layout import early_maps, flags_now, tree_pids
from .pagefile import PageFile, sync_files
from .netns import detach as detach_netns, save as save_netns
from ..kernel.rtnl import preload as preload_netlink



@dataclass
class DumpResult:
    pid: int
    images: Path
    threads: int
    memory_bytes: int      # bytes of the process's mappings
    pages_bytes: int       # bytes of page data written
    frozen_s: float        # how long the process could not run
    total_s: float
    processes: int = 1     # processes in the tree (zombies included)
    parent_bytes: int = 0  # bytes of pages left to the parent chain (incremental dumps)
    incremental: bool = False
    tracking: str = ""     # backends that chose the pages to write ("full" where none could)
    image_id: str = ""
    notes: list[str] = field(default_factory=list)   # fallbacks taken, for the caller to show
    spans: dict[str, float] = field(default_factory=dict)  # seconds per phase (Spans), for benchmarks
    snapshot: bool = False  # pages read from copy-on-write snapshots after the thaw
    live_route: str = ""    # live snapshots: "uffd", "fork", or "uffd,fork" (per process)
    stops_before_s: float = 0.0   # short stops before the freeze (live by uffd: making the userfaultfd)
    precopy_rounds: list[int] = field(default_factory=list)   # bytes copied per round before the freeze


class Spans:
    """Wall time per phase of one dump (time.perf_counter), for the benchmarks to print
    where the frozen window goes; `mark(name)` closes the phase running since the last mark."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.spans: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.spans[name] = self.spans.get(name, 0.0) + now - self.t
        self.t = now


def check_owner(pid: int) -> dict[str, str]:
    """A caller may only dump processes that are entirely its own."""
    st = proc.status(pid)
    me = os.geteuid()
    if me != 0:
        uids = {int(x) for x in st["Uid"].split()}
        gids = {int(x) for x in st["Gid"].split()}
        if uids != {me} or gids - {os.getegid(), *os.getgroups()}:
            raise PermissionDeniedError(
                f"process {pid} belongs to uid {st['Uid'].split()[0]}; you (uid {me}) may only "
                "dump processes that run entirely with your own credentials")
    return st


def _file_paths(p: pb.Process) -> set[str]:
    """The files a process maps, and its executable."""
    return {v.path for v in p.mm.vmas if v.kind in (pb.FILE_PRIVATE, pb.FILE_SHARED)} | {p.mm.exe}


def _mapped_files(paths: set[str]) -> list[pb.MappedFile]:
    out = []
    for path in sorted(paths):
        try:
            s = os.stat(path)
        except FileNotFoundError:
            continue
        out.append(pb.MappedFile(path=path, size=s.st_size, mtime_ns=s.st_mtime_ns, build_id=elf.build_id(path)))
    return out


def _cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    return []


def _tree_ids(ft: ptree.FrozenTree, statuses: dict[int, dict]) -> dict[int, int]:
    """Host PID -> PID in the tree's own namespace, for every member (`statuses`: those
    of the frozen ones, already read)."""
    out = {}
    depth = len(proc.status_ns_pids(statuses[ft.root], ft.root))
    for pid in ft.order:
        ns = proc.status_ns_pids(statuses[pid], pid) if pid in statuses else proc.ns_pids(pid)
        if len(ns) != depth:
            raise UnsupportedError(f"process {pid} runs in a PID namespace of its own inside the tree; "
                                   "not supported")
        out[pid] = ns[-1]
    return out


def _relations(ft: ptree.FrozenTree, pid: int, ns: dict[int, int], p: pb.Process) -> None:
    """ppid, pgid and sid as the tree's namespace numbers them; 0 means 'outside the
    tree: whatever the restoring parent has', which is legal only where the root has it."""
    e, r = ft.table[pid], ft.table[ft.root]
    p.orphan = pid in ft.orphans
    p.ppid = ns.get(e.ppid, 1 if p.orphan else 0) if pid != ft.root else 0
    leaderless = pid != ft.root and sessions.leaderless(ft, pid, p, e.sid, e.pgid)
    for name in ("pgid", "sid"):
        if leaderless and (name == "sid" or p.pgid):
            continue                      # a session whose leader exited (sessions.py)
        host = getattr(e, name)
        if host in ns:
            setattr(p, name, ns[host])
        elif host == getattr(r, name):
            setattr(p, name, 0)
        else:
            kind = "process group" if name == "pgid" else "session"
            raise UnsupportedError(
                f"process {pid} is in {kind} {host}, whose leader is neither in the tree nor "
                f"shared with the tree's root {ft.root}; not supported yet")


def _zombie(pid: int, ns: dict[int, int]) -> pb.Process:
    f = proc.stat_fields(pid)
    code = int(f[49]) if len(f) > 49 else 0   # /proc/PID/stat field 52: exit_code (wait status)
    return pb.Process(pid=ns[pid], comm=proc.comm(pid), zombie=True,
                      exit_code=(code >> 8) & 0xFF, exit_signal=code & 0x7F)


def _live_retried(fn):
    """A live snapshot by write-protect that the job spoiled (it unmapped or dropped memory
    not yet copied: SnapshotLostError, image removed, job running) is taken again by the
    fork route, which no layout change can spoil, when the route was left to us."""
    @functools.wraps(fn)
    def dump(*args, **kw):
        try:
            return fn(*args, **kw)
        except SnapshotLostError as e:
            if not kw.get("live") or kw.get("live_route", "auto") != "auto":
                raise
            r = fn(*args, **{**kw, "live_route": "fork"})
            r.notes.insert(0, f"{e}: taken again by the fork route")
            return r
    return dump


def _no_gc_pause(fn):
    """Python's cycle collector off for the dump: a full collection (tens of ms after a big
    plan left many objects) would otherwise land in the pause now and then; the dump's
    own garbage is freed by reference counting."""
    @functools.wraps(fn)
    def dump(*args, **kw):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kw)
        finally:
            if was:
                gc.enable()
    return dump


@_no_gc_pause
@_live_retried
def dump(pid: int, images: str | os.PathLike, leave_running: bool = False,
         policies: files.FilePolicies | None = None, show_progress: bool = True,
         tree: bool = True, parent: str | os.PathLike | None = None,
         tracker: "TreeTracker | None" = None, track_mem: bool = False,
         live: bool = False, pre_dump: bool = False, on_dumped=None,
         shell_job: bool = False, tcp_established: bool = False, on_frozen=None,
         freeze_cgroup: str | None = "auto", netns: bool = False, stream=None,
         cow: bool | None = None, live_route: str = "auto", precopy: bool = True) -> DumpResult:
    """Checkpoint `pid` and (unless `tree=False`) all its descendants into `images`;
    kill them all afterwards unless `leave_running`.

    `parent`: an earlier image of the same tree; only pages changed since are written, the
    rest are marked as held by the parent chain. Changes come from `tracker` (live
    trackers a long-lived caller keeps, used when its state is relative to `parent`) or
    else from content hashing against the parent. With `tracker`, every process is left
    armed, so the caller's next dump can name this image as its parent. `track_mem`
    also saves page digests beside the image (for a later fresh hpcckpt process).
    `pre_dump`: copy the pages while the tree runs on (the image is only a parent for a
    final dump, which writes what changed since); `live`: the image is the state at one
    instant, but the tree runs on while the pages are written (copy-on-write snapshot).
    `on_dumped(path)`: called once the image is sealed, before the tree is killed or
    thawed (a caller's hook, e.g. hpcckptd's "dumped"); if it raises, the tree is thawed
    and the image removed.
    `shell_job`: the tree may run in a terminal held outside it (ttys.py); refused otherwise.
    `tcp_established`: checkpoint established TCP connections (engine/tcp.py); they are
    locked from the dump to the restore (kept locked when the tree is killed).
    `on_frozen(pids)`: called with the tree's PIDs once all are frozen, before anything
    is read or written (hpcckptd's "frozen" hook); raising thaws.
    `freeze_cgroup`: a cgroup v2 to freeze the tree through (it cannot fork meanwhile);
    "auto" (default): the root's own cgroup if it holds exactly the tree; None: ptrace alone.
    `netns`: the tree runs in a network namespace of its own, saved with the image
    (engine/netns.py); a restore makes a new one from it. When the tree is killed, the
    node side of its veths goes too, unless the namespace is bind-mounted (the site's).
    `stream`: write the pages to a connection as they are read instead of to page files
    (a migration's; engine/streamdump.py says what it must offer); `images` then gets the
    rest only. The tree stays frozen until `on_dumped` returns (or raises: thawed).
    `cow`: a dump that lets the tree run on reads its pages from a copy-on-write fork of
    each process after the thaw (as `live` does) when that is cheaper than copying them
    while frozen (None: decided by `_snapshot_pays`); True: always; False: never.
    `live_route`: how `live` keeps the instant's pages while the tree runs: "uffd"
    (write-protect, engine/wpsnapshot.py; a process it can't serve is forked, with a
    note), "fork" (engine/snapshot.py), "auto" (uffd where it can, else fork).
    `precopy`: an incremental dump with uffd-wp tracking since `parent` (the caller's, or
    a pre-dump's holder) first copies the changes in rounds while the tree runs
    (engine/precopy.py) and freezes only for the last round's (not with cow=True).
    """
    t0 = time.monotonic()
    if stream is not None and (live or pre_dump or parent is not None or tracker is not None or track_mem):
        raise HpcckptError("a streamed dump (migration) is a full dump of a frozen tree: no --live, "
                           "--pre-dump, --parent or --track-mem")
    check_owner(pid)
    policies = dataclasses.replace(policies or files.FilePolicies(), shell_job=shell_job)
    terms = None
    if live or pre_dump:
        leave_running = True
    # a one-shot caller (no tracker of its own) that leaves the job running with tracking
    # asked for: arm it, and hand it to a holder process at the end (incremental.hand_off)
    own = tracker is None and leave_running and (pre_dump or track_mem)
    if own:
        tracker = TreeTracker()
    par = Parent.open(parent) if parent is not None else None
    if par is not None:
        par.preload()                     # before the freeze: nothing of it changes
    notes: list[str] = []
    sp = Spans()
    pc, adopted = None, False
    # where the pause counts (the tree runs on after the dump), smaps is read before the
    # freeze, and before pre-copy rounds, which then copy what the job writes meanwhile
    # (and before a live snapshot's prearm, which needs it too)
    wp_live = live and live_route != "fork" and tracker is None
    early = early_maps(pid, tree) if leave_running and on_dumped is None and stream is None else {}
    if early:
        sp.mark("read smaps (running)")
    if precopy and cow is not True and par is not None and not (live or pre_dump) and stream is None:
        tracker, adopted = _precopy_trackers(par, tracker, own, notes)
        if tracker is not None and tracker.valid_for(par.inv.image_id):
            pc = PreCopy.run({h: t for h, t in tracker.trackers.items() if isinstance(t, UffdWpTracker)},
                             notes)
            for h in pc.failed:
                tracker.forget(h)
            sp.mark("pre-copy rounds (running)")
    wps: dict[int, WpSnapshot] = {}
    # a VMA takes one userfaultfd: where the caller keeps async uffd-wp tracking (armed on
    # every process by this dump), handing it over costs more than a fork (docs/tracking.md)
    if live and live_route == "uffd" and not wp_live:
        notes.append("live snapshot forked: write-protect is not used while uffd-wp tracking is kept")
    stops_before = 0.0
    if wp_live:                         # arm write-protect while the tree still runs
        wps = _wp_prearm(pid, tree, notes, early)
        stops_before = sum(s.pause_s for s in wps.values())
        sp.mark("prearm write-protect (running)")
    fresh_dir = not os.path.exists(images)
    iset = ImageSet(images, create=True)
    created = set(os.listdir(iset.path))
    snaps: dict[int, "snapshot.Snapshot"] = {}
    writers: dict[int, PageFile] = {}
    # a pre-dump's fds are never restored: its connections are read (and let go) rather than refused
    conns = tcp.DumpConnections(tcp_established or pre_dump, pid)
    if netns:
        preload_netlink()          # not while the tree is frozen
    if tcp_established and not leave_running:    # the tree will be killed: hold its listeners' clients off
        conns = listeners.quiesce(conns, pid)
    if early:
        outside = shared.outside_before(list(early))
        sp.mark("pipe holders (running)")
    try:
        ft = ptree.freeze_tree(pid, tree, freeze_cgroup)
    except BaseException:
        conns.release()                          # nothing locked but the listeners: let them go
        conns.cleanup()
        if pc is not None:
            pc.close()
        if adopted:
            tracker.close()
        for s in wps.values():
            s.close()
        raise
    t_frozen = ft.stopped_at    # the pause counts from the first process stopped
    sp.mark("freeze")
    if ft.cgroup is not None:
        notes.append(f"frozen through cgroup {ft.cgroup.path} (cgroup.freeze)")
    t_thawed = None
    try:
        if on_frozen:
            on_frozen(list(ft.order))
        statuses = {p: check_owner(p) for p in ft.frozen}
        ns = _tree_ids(ft, statuses)
        descs = shared.Descriptions.collect(list(ft.frozen))
        descs.parents = {h: ft.table[h].ppid for h in ft.frozen}
        descs.cache["tcp"] = conns
        if early:
            descs.cache["outside-before"] = outside
        descs.cache["runs_on"] = leave_running or live or pre_dump    # sockets.waiting_connections
        shm = ShmemTable(iset.path)
        terms = ttys.DumpTerminals(descs, ns, shell_job)
        sp.mark("frozen: tree ids, owners, descriptions")
        procs: dict[int, pb.Process] = {}
        vmas: dict[int, list] = {}
        # a tree killed after the dump keeps the scratch (ft.thaw takes it away on failure)
        captured = capture_tree(ft, iset, policies, statuses, descs, shm, keep_scratch=not leave_running,
                                 early=early)
        unsure = {h for h, c in captured.items() if c[2]}    # VmFlags from before the freeze
        for p_host in ft.order:
            if p_host in ft.zombies:
                procs[p_host] = _zombie(p_host, ns)
            else:
                procs[p_host], vmas[p_host], _ = captured[p_host]
            _relations(ft, p_host, ns, procs[p_host])
            terms.process(p_host, procs[p_host], ft.table[p_host].sid)
        sp.mark("frozen: capture")
        ipc, undo = sysvipc.dump(pid, {h: ns[h] for h in ft.order if h not in ft.zombies}, vmas,
                                 iset.path, notes)
        for h, u in undo.items():
            procs[h].sem_undo.extend(u)
        net = save_netns(pid, [h for h in ft.order if h not in ft.zombies]) if netns else None
        net_ino = os.stat(f"/proc/{pid}/ns/net").st_ino if netns else None
        tty_images = terms.collect()
        terms.read_queues()               # last of what reads the frozen tree's state
        if leave_running:
            terms.write_back()
        notes.extend(descs.notes)
        sp.mark("frozen: ipc, terminals")
        live_procs = [h for h in ft.order if h not in ft.zombies]
        changes, used = {}, {}
        # digests compared on a fork after the thaw, not while frozen (the job runs on)
        # (a fork: refused where the memory held exceeds half of what is available, as for cow)
        defer = (leave_running and not pre_dump and on_dumped is None and cow is not False
                 and not wp_live and par is not None
                 and sum(_estimate(vmas[h], None)[1] for h in live_procs) <= memory.mem_available() // 2)
        deferred: dict[int, HashingTracker] = {}
        for h in live_procs:
            changes[h], used[h] = _changes_of(h, procs[h], vmas[h], par, tracker, notes, defer)
            if isinstance(changes[h][0], HashingTracker):
                deferred[h] = changes[h][0]
                changes[h] = (None, changes[h][1])    # until the fork is read: see below
            if pc is not None:
                changes[h] = (pc.changes(h, changes[h][0], procs[h].mm.vmas), changes[h][1])
        sp.mark("frozen: collect")
        if tracker is not None:
            _keep_armed(tracker, ft, live_procs, vmas, used, notes)
            sp.mark("frozen: arm")
        pagemaps = {h: pb.Pagemap(pages_file=f"pages-{procs[h].pid}.img") for h in ft.order}
        if stream is not None:   # a migration's: pages to its connection as they are read
            plans = {h: plan_incremental(h, list(procs[h].mm.vmas), *changes[h],
                                        full=_populated(vmas[h])) for h in live_procs}
            total = sum(p.write_bytes for p in plans.values())
            prog = Progress(f"dump {pid}", total, enabled=show_progress)
            inv = _tree_inventory(pid, ft, procs, shm, tty_images, ipc, par, used, pre_dump, iset.path, net)
            pages_bytes = streamdump.send(stream, iset, ft.order, live_procs, procs, plans, pagemaps, inv, prog)
            t_thawed = _end_frozen(ft, conns, leave_running, on_dumped, iset.path, notes)
            if net is not None and not leave_running:
                notes.extend(detach_netns(net, net_ino))
            terms.close()
            return DumpResult(pid=pid, images=iset.path, threads=ft.threads,
                              memory_bytes=sum(v.end - v.start for p in procs.values() for v in p.mm.vmas),
                              pages_bytes=pages_bytes, frozen_s=t_thawed - t_frozen,
                              total_s=time.monotonic() - t0, processes=len(ft.order), image_id=inv.image_id,
                              notes=notes)
        estimate = [_estimate(vmas[h], changes[h][0]) for h in live_procs]
        may_fork = leave_running and not pre_dump and on_dumped is None
        held_bytes = sum(h for _, h in estimate)
        if pc is not None and _snapshot_pays(pc.final_bytes, held_bytes, may_fork, cow):
            pc.drop()           # the job wrote too fast for the rounds: as without them (a fork)
        forked = live or bool(deferred) or not (pc and pc.procs) and _snapshot_pays(sum(w for w, _ in estimate), held_bytes,
                                                                  may_fork, cow)
        plans: dict[int, IncrementalPlan] = {}
        rest: dict[int, list] = {}        # mappings planned and copied from the snapshot copy
        held: dict[int, list] = {}        # the plan left to the pre-copy rounds' copies
        if wp_live:
            armed: dict[int, WpSnapshot] = {}
            for h in live_procs:
                _wp_arm(h, ft.frozen[h], procs[h], vmas[h], changes[h], wps, armed, plans, writers,
                        iset, pagemaps[h], notes)
            for s in wps.values():    # prearmed, not in the tree any more
                s.close()
            wps = armed
            sp.mark("frozen: write-protect")
        if forked:
            # while frozen: only what a fork does not copy (read from the target now) and the
            # fork itself; which pages to write is decided from the copy after the thaw
            for h in live_procs:
                if h in wps:
                    continue
                if h in unsure:           # what the fork leaves out must be known exactly
                    flags_now(h, vmas[h], procs[h], notes)
                    unsure.discard(h)
                keep = _not_forked(procs[h].mm.vmas)
                kept = [v for v in procs[h].mm.vmas if _inside((v.start, 0), keep)]
                rest[h] = [v for v in procs[h].mm.vmas if not _inside((v.start, 0), keep)]
                plans[h] = plan_incremental(h, kept, *changes[h])    # deferred digests: whole
                # staged (no file write in the pause), unstaged after the thaw
                writers[h] = PageFile(h, iset, pagemaps[h], plans[h].write_bytes <= memory.stage_budget())
                writers[h].copy(plans[h].write, _no_progress)
                try:
                    snaps[h] = snapshot.take(ft.frozen[h])
                except KernelError as e:
                    if live or not _alive(h):
                        raise
                    notes.append(f"process {procs[h].pid}: no copy-on-write snapshot ({e}); its "
                                 "pages were copied while it was frozen")
                    if h in deferred:
                        ht = deferred.pop(h)
                        changes[h] = (_collect_deferred(ht, h, vmas[h], None, _kept(tracker, h, ht)),
                                      changes[h][1])
                    more = plan_incremental(h, rest.pop(h), *changes[h])
                    writers[h].unstage()
                    writers[h].copy(more.write, _no_progress)
                    plans[h] = _joined(plans[h], more)
            sp.mark("frozen: snapshot")
        else:
            for h in live_procs:
                if pc and h in pc.procs and changes[h][0] is not None:
                    now, held[h] = pc.plan(h, list(procs[h].mm.vmas), *changes[h], full=_populated(vmas[h]))
                    plans[h] = IncrementalPlan(write=now)    # the rest from the rounds' copies
                    continue
                plans[h] = plan_incremental(h, list(procs[h].mm.vmas), *changes[h], full=_populated(vmas[h]))
            sp.mark("frozen: plan")
        facts = _process_facts(pid)       # what the inventory reads from the root, while frozen
        if forked or pre_dump:
            notes.extend(conns.release())
            ft.thaw()
            t_thawed = time.monotonic()
            sp.mark("thaw")
            notes.extend(conns.cleanup())
        for s in wps.values():
            s.serve()
        for h, ht in deferred.items():
            changes[h] = (_collect_deferred(ht, h, vmas[h], snaps[h].child, _kept(tracker, h, ht)),
                          changes[h][1])
        if deferred:
            sp.mark("digests from the snapshot copies")
        from_copy = {h: plan_incremental(snaps[h].child, rest[h], *changes[h]) for h in snaps}
        if from_copy:
            sp.mark("plan from the snapshot copies")
        total = sum(p.write_bytes for p in plans.values()) + sum(p.write_bytes for p in from_copy.values())
        prog = Progress(f"{'pre-dump' if pre_dump else 'dump'} {pid}", total, enabled=show_progress)
        # a dump that lets the tree run on afterwards copies to memory while frozen and
        # writes the image after the thaw (no file write or fsync in the pause), up to a budget
        stage = (leave_running and not (forked or pre_dump) and on_dumped is None
                 and total <= memory.stage_budget())
        for h in live_procs:
            if h not in writers:
                writers[h] = PageFile(h, iset, pagemaps[h], stage)
        pages_bytes = parent_bytes = 0
        for h in live_procs:
            w = writers[h]
            if h in from_copy:
                w.unstage()
                w.source = snaps[h].child
                w.copy(from_copy[h].write, prog)
                plans[h] = _joined(plans[h], from_copy[h])
            elif not forked:              # forked without a copy: all copied while frozen
                w.copy(plans[h].write, prog)
        for h, s in wps.items():
            writers[h].unstage()
            s.copy(writers[h], prog)
            s.close()
        sp.mark("copy pages")
        if ipc is not None and ipc.sem:   # last of the frozen reads: it unshares the threads' SEM_UNDO list
            for h, u in sysvipc.threaded_undo(pid, {h: ns[h] for h in live_procs}, vmas, notes,
                                              final=not (leave_running or live or pre_dump)).items():
                procs[h].sem_undo.extend(u)
        for h in list(snaps):             # done with the copies: the job's writes copy nothing now
            snapshot.release(snaps.pop(h))
        sp.mark("release snapshots")
        if t_thawed is None and leave_running and on_dumped is None:
            # the tree's state is all in memory now: it runs on while the page runs are
            # listed and every file is written and synced
            notes.extend(conns.release())
            ft.thaw()
            t_thawed = time.monotonic()
            sp.mark("thaw")
            notes.extend(conns.cleanup())
        for h in live_procs:
            if h in held:
                plans[h].in_parent += pc.finish(h, held[h], writers[h])
            writers[h].close(plans[h].in_parent, sync=False)
            pages_bytes += pagemaps[h].pages_bytes
            parent_bytes += pagemaps[h].parent_bytes
        sp.mark("page runs")
        for h in unsure:
            flags_now(h, vmas[h], procs[h], notes, after=True)
        if unsure:
            sp.mark("check madvise flags")
        for h in ft.order:
            p = procs[h]
            iset.write_message(f"process-{p.pid}.img", "process", p, sync=False)
            iset.write_message(f"pagemap-{p.pid}.img", "pagemap", pagemaps[h], sync=False)
        sp.mark("write messages")
        for w in writers.values():
            w.flush()                     # staged pages to their files
        sync_files(iset.path, set(os.listdir(iset.path)) - created)
        sp.mark("sync")
        prog.finish()
        inv = _tree_inventory(pid, ft, procs, shm, tty_images, ipc, par, used, pre_dump, iset.path, net,
                              facts)
        sp.mark("inventory")
        if t_thawed is not None:
            iset.seal(inv)
            if on_dumped:
                on_dumped(iset.path)
        else:
            iset.seal(inv)
            t_thawed = _end_frozen(ft, conns, leave_running, on_dumped, iset.path, notes)
            if not leave_running and net is not None:
                notes.extend(detach_netns(net, net_ino))
        sp.mark("seal, kill or thaw")
        if tracker is not None:
            tracker.base_id = inv.image_id if leave_running else None
        if own:
            notes.extend(hand_off(tracker, iset.path, inv.image_id, {h: procs[h].pid for h in live_procs}))
            tracker.close()
        elif adopted:
            tracker.close()
    except BaseException:
        conns.release()
        if terms is not None:
            terms.write_back()            # before the tree runs: nothing of its terminals lost
            terms.close()
        if not ft.thawed:                 # a cgroup-frozen tree thawed twice would stop again
            ft.thaw()
        for w in writers.values():
            w._abort()
        conns.cleanup()
        if tracker is not None:
            tracker.close() if own or adopted else tracker.invalidate()   # collected changes went nowhere
        for s in snaps.values():
            snapshot.release(s)
        for s in wps.values():
            s.close()
        if pc is not None:
            pc.close()
        _remove_new(iset.path, created)
        if fresh_dir:
            shutil.rmtree(iset.path, ignore_errors=True)
        raise
    terms.close()
    for s in snaps.values():
        snapshot.release(s)
    if pc is not None:
        pc.close()
    if track_mem and (tracker is None or own or "hashing" in tracker.name):
        try:
            chain = load_chain(iset.path, verify=False)
            for h in live_procs:
                save_digests(iset.path, chain, procs[h])
        except (HpcckptError, OSError) as e:
            notes.append(f"page digests not saved beside {iset.path}: {e}")
    return DumpResult(pid=pid, images=iset.path, threads=ft.threads,
                      memory_bytes=sum(v.end - v.start for p in procs.values() for v in p.mm.vmas),
                      pages_bytes=pages_bytes, frozen_s=t_thawed - t_frozen,
                      total_s=time.monotonic() - t0, processes=len(ft.order),
                      parent_bytes=parent_bytes, incremental=par is not None,
                      tracking=inv.tracking, image_id=inv.image_id, notes=notes, spans=sp.spans,
                      snapshot=bool(from_copy),
                      live_route=",".join(r for r, on in (("uffd", wps), ("fork", from_copy)) if on),
                      stops_before_s=stops_before, precopy_rounds=pc.rounds if pc is not None else [])


COW_SHARE = 16            # fork once the pages to copy are 1/16 of those the image holds
COW_MIN_BYTES = 16 << 20  # below this, copying costs about what the fork's own stops do


def _snapshot_pays(write: int, held: int, may: bool, cow: bool | None) -> bool:
    """Copy from a fork after the thaw rather than while frozen? A fork copies page
    tables (31 ms per GiB of 4 KiB pages held, ~2 ms with huge pages); copying scattered
    pages costs ~3.4 us each (~830 ms per GiB), so the fork wins once the pages to write
    are beyond ~1/27 of those held; COW_SHARE keeps a margin. `write`, `held`: estimates
    (_estimate). Until the copy is done, each page the job writes is duplicated: refused
    when the pages held exceed half of MemAvailable."""
    if cow is not None:
        return cow and may
    if not may or write < COW_MIN_BYTES or write * COW_SHARE < held:
        return False
    return held <= memory.mem_available() // 2


def _tree_inventory(pid: int, ft: ptree.FrozenTree, procs: dict[int, pb.Process], shm: ShmemTable,
                    tty_images, ipc, par: "Parent | None", used: dict[int, str], pre_dump: bool,
                    path: Path, net=None, facts: dict | None = None) -> pb.Inventory:
    """The inventory of the tree's image, but for the files' digests (ImageSet.seal).
    `facts`: what it reads from the live root, taken while frozen (_process_facts)."""
    inv = _inventory(procs[pid], pid, facts)
    inv.pids[:] = [procs[h].pid for h in ft.order]
    inv.shmem.extend(shm.objects)
    inv.ttys.extend(tty_images)
    if ipc is not None:
        inv.own_ipc_namespace = True
        inv.ipc.CopyFrom(ipc)
    if net is not None:
        inv.netns.CopyFrom(net)
    others = set().union(*(_file_paths(procs[h]) for h in ft.order if h not in ft.zombies and h != pid))
    inv.files.extend(_mapped_files(others - _file_paths(procs[pid])))   # each file looked at once
    inv.image_id = new_image_id()
    inv.pre_dump = pre_dump
    inv.tracking = ",".join(sorted(set(used.values()))) if par else ""
    if par is not None:
        inv.parent = relative_parent(path, par.path)
        inv.parent_id = par.inv.image_id
        inv.chain_depth = par.inv.chain_depth + 1
    return inv


def _end_frozen(ft: ptree.FrozenTree, conns, leave_running: bool, on_dumped, path: Path,
                notes: list[str]) -> float:
    """After the image is complete: the caller's `on_dumped` (a migration waits there for
    the destination to confirm its restore; raising thaws the tree here), then the tree is
    killed (or thawed). Returns when it stopped being frozen."""
    if on_dumped:
        on_dumped(path)
    t_thawed = time.monotonic()
    if leave_running:
        notes.extend(conns.release())
        ft.thaw()
        notes.extend(conns.cleanup())
    else:
        ft.kill()
        conns.keep()
    return t_thawed


def _estimate(vmas: list, dirty) -> tuple[int, int]:
    """(bytes to write, bytes the image holds), from smaps' Anonymous and Swap counts
    (read anyway) and the changes reported: known before any page is scanned."""
    write = held = 0
    for v in vmas:
        if v.shared or v.special:
            continue
        n = (v.anon_kb + v.swap_kb) * 1024
        held += n
        write += n if dirty is None else min(n, len(dirty.get(v.start, ())) * memory.PAGE_SIZE)
    return write, held


def _populated(vmas: list) -> frozenset:
    """Private mappings every page of which is an anonymous page (smaps, read while
    frozen): their pages are all saved, no page walk needed to know it (~20 ms per GiB)."""
    return frozenset(v.start for v in vmas if not v.shared and not v.special and v.swap_kb == 0
                     and v.anon_kb * 1024 == v.end - v.start)


def _joined(a: IncrementalPlan, b: IncrementalPlan) -> IncrementalPlan:
    return IncrementalPlan(write=a.write + b.write, in_parent=a.in_parent + b.in_parent)


def _no_progress(n: int) -> None:
    pass


def _collect_deferred(ht: HashingTracker, h: int, vmas: list, source: int | None, keep: bool):
    """A deferred hashing collect (see _changes), from `source` (a fork) or `h` (frozen);
    the tracker is disarmed after unless it is the caller's (`keep`)."""
    try:
        return ht.collect(h, [v for v in vmas if not set(v.vmflags) & set(snapshot.NOT_COPIED)]
                          if source else vmas, source)
    finally:
        if not keep:
            ht.disarm()


def _kept(tracker: "TreeTracker | None", h: int, ht: HashingTracker) -> bool:
    return tracker is not None and tracker.trackers.get(h) is ht


def _changes_of(h: int, p: pb.Process, vmas: list, par: "Parent | None", tracker: "TreeTracker | None",
                notes: list[str], defer: bool = False) -> tuple[tuple, str]:
    """((changed pages, the parent's pages), how they are known) for one frozen process:
    (None, None) for a full dump. Collecting re-arms live trackers, so it is done once,
    while frozen."""
    if par is None:
        return (None, None), "full"
    ppages = par.pages(p.pid)
    if ppages is None:
        notes.append(f"process {p.pid} is not in parent {par.path}: dumped whole")
        return (None, None), "full"
    dirty, how = _changes(h, p.pid, vmas, par, tracker, notes, defer)
    return (dirty, ppages if dirty is not None else None), how


def _changes(h: int, ns_pid: int, vmas: list, par: "Parent", tracker: "TreeTracker | None",
             notes: list[str], defer: bool = False):
    """Pages changed since the parent: the live tracker if its state is relative to the
    parent, else hashing against the parent; (None, "full") if neither can say. `defer`:
    the hashing tracker itself instead of its collect (which reads all memory), for the
    caller to collect from a fork after the thaw."""
    if tracker is not None and tracker.valid_for(par.inv.image_id) and h in tracker.trackers:
        t = tracker.trackers[h]
        if defer and isinstance(t, HashingTracker):
            return t, t.name          # the caller's: collected from the fork, kept
        try:
            return t.collect(h, vmas), t.name
        except ProcessGoneError:
            raise
        except HpcckptError as e:
            notes.append(f"process {ns_pid}: {t.name} tracking failed ({e}); comparing page digests")
            tracker.forget(h)
        finally:
            notes.extend(t.take_notes())
    dirty = collect_held(par, h, ns_pid, vmas, tracker, notes)
    if dirty is not None:
        return dirty, "uffd-wp"
    try:
        ht = par.hashing_tracker(h, ns_pid)
        if defer:
            return ht, "hashing"
        try:
            return ht.collect(h, vmas), "hashing"
        finally:
            ht.disarm()
    except ProcessGoneError:
        raise
    except HpcckptError as e:
        notes.append(f"process {ns_pid}: no change tracking against {par.path} ({e}); dumped whole")
        return None, "full"


def _keep_armed(tracker: "TreeTracker", ft: ptree.FrozenTree, live_procs: list[int], vmas: dict,
                used: dict[int, str], notes: list[str]) -> None:
    """Every process tracked from this dump on: collect re-armed the ones it read; the rest
    (new processes, a changed parent, a failed tracker) are armed now, while frozen."""
    for h in list(tracker.trackers):
        if h not in live_procs:
            tracker.forget(h)
    for h in live_procs:
        t = tracker.trackers.get(h)
        if t is not None and used.get(h) == t.name and t.pid == h:
            continue
        try:
            t = tracker.new(h)
            t.arm(h, ft.frozen[h], vmas[h])
            notes.extend(t.take_notes())
        except ProcessGoneError:
            raise
        except HpcckptError as e:
            tracker.forget(h)
            notes.append(f"process {h}: cannot track its memory ({e}); its next dump compares digests")


WP_REFUSED_MAX = 16 << 20   # pages in mappings uffd refused, copied while frozen, beyond which: fork


def _wp_arm(h: int, fr: Frozen, p: pb.Process, vmas: list, changes: tuple, wps: dict, armed: dict,
            plans: dict, writers: dict, iset: ImageSet, pagemap: pb.Pagemap, notes: list[str]) -> None:
    """A live snapshot of one frozen process by write-protect (wpsnapshot.py): armed, its
    pages planned now (the target's page tables change once it runs), those outside the
    protected mappings copied now. Left to the fork route (not in `wps`) when the kernel
    refuses, or refuses mappings holding more than WP_REFUSED_MAX to copy while frozen
    (e.g. those the job's async tracker holds)."""
    from ..tracking.target import injector
    s = wps.pop(h, None)
    try:
        if s is not None:
            s.protect(vmas)
        else:
            with injector(h, fr) as inj:
                s = WpSnapshot.arm(h, inj, vmas)
    except ProcessGoneError:
        raise
    except HpcckptError as e:
        if s is not None:
            s.close()
        notes.append(f"process {p.pid}: no write-protect live snapshot ({e}); forked instead")
        return
    try:
        plan = plan_incremental(h, list(p.mm.vmas), *changes, full=_populated(vmas))
        now = s.split(plan.write)
        if sum(n for _, n in now) > WP_REFUSED_MAX and s.refused:
            why = "; ".join(f"{a:#x}-{b:#x}: {e}" for a, b, e in s.refused[:3])
            notes.append(f"process {p.pid}: write-protect refused on mappings holding "
                         f"{sum(n for _, n in now) >> 20} MiB ({why}); forked instead")
            s.close()
            return
        # staged (no file write in the pause), unstaged after the thaw
        writers[h] = PageFile(h, iset, pagemap, sum(n for _, n in now) <= memory.stage_budget())
        writers[h].copy(now, _no_progress)
    except BaseException:
        s.close()
        raise
    armed[h], plans[h] = s, plan


def _precopy_trackers(par: Parent, tracker: "TreeTracker | None", own: bool, notes: list[str]):
    """(tracker, adopted): the caller's tracker; or, when it has none of its own state for
    `par` (a one-shot dump after a pre-dump), the uffd-wp trackers a holder keeps since
    `par`, taken over now (before the freeze), so the rounds can collect them."""
    if tracker is not None and (tracker.valid_for(par.inv.image_id) or not own):
        return tracker, False
    got = par.take_held(notes)
    if not got:
        return tracker, False
    adopted = tracker is None
    tracker = tracker or TreeTracker()
    tracker.trackers.update(got)
    tracker.base_id = par.inv.image_id
    return tracker, adopted


def _wp_prearm(pid: int, tree: bool, notes: list[str], early: dict[int, list]) -> dict:
    """Write-protect armed before the freeze (wpsnapshot.prearm) on the root and, for a
    tree, its descendants as they are now (one found later is armed while frozen);
    `early`: their smaps, when read already (layout.early_maps)."""
    out = {}
    for h in early or tree_pids(pid, tree):
        try:
            out[h] = WpSnapshot.prearm(h, early.get(h))
        except HpcckptError as e:
            notes.append(f"process {h}: write-protect not armed before the freeze ({e})")
    return out


def _not_forked(vmas) -> list[tuple[int, int]]:
    return [(v.start, v.end) for v in vmas if set(v.vmflags) & set(snapshot.NOT_COPIED)]


def _inside(run: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    return any(s <= run[0] < e for s, e in spans)


def _process_facts(pid: int) -> dict:
    """What the inventory reads from the live root process (taken while it is frozen:
    the inventory is written after the thaw, when the process may have exited)."""
    return dict(own_pid_namespace=len(proc.ns_pids(pid)) > len(proc.ns_pids(os.getpid())),
                vdso_xxh3=vdso.digest(pid))


def _inventory(p: pb.Process, pid: int, facts: dict | None = None) -> pb.Inventory:
    facts = facts or _process_facts(pid)
    sizes = {v.kind: v.end - v.start for v in p.mm.vmas}
    return pb.Inventory(
        hpcckpt_version=__version__, kernel=platform.release(), arch=platform.machine(),
        cpu_flags=_cpu_flags(), xsave_size=len(p.threads[0].xstate), created=time.time(),
        host=socket.gethostname(), root_pid=p.pid, pids=[p.pid],
        own_pid_namespace=facts["own_pid_namespace"],
        files=_mapped_files(_file_paths(p)), uid=p.creds.uid,
        vdso_size=sizes.get(pb.VDSO, 0), vvar_size=sizes.get(pb.VVAR, 0),
        vvar_vclock_size=sizes.get(pb.VVAR_VCLOCK, 0), vdso_xxh3=facts["vdso_xxh3"])


def _remove_new(path: Path, before: set[str]) -> None:
    """Take back what a failed dump wrote, and nothing else."""
    for name in set(os.listdir(path)) - before:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
