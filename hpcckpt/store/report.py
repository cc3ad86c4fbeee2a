"""Human output for `hpcckpt ls` and `hpcckpt stats`: a table and a PNG."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .model import Checkpoint

if TYPE_CHECKING:
    from .store import Store


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _secs(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_listing(checkpoints: Sequence[Checkpoint]) -> str:
    """A fixed-width table, one checkpoint a line, sorted by job then seq."""
    header = ("JOB", "SEQ", "GEN", "PARENT", "TIME", "HOST", "NPROCS", "MEMORY", "IMAGE", "PAGES",
              "FREEZE_S", "DUMP_S", "WRITE_S", "BACKEND", "STATUS")
    rows = [header]
    for c in sorted(checkpoints, key=lambda c: (c.job, c.seq)):
        rows.append((
            c.job, f"{c.seq:08d}", str(c.generation), "-" if c.parent is None else f"{c.parent:08d}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.time)), c.host or "-", str(c.nprocs),
            _size(c.memory_bytes), _size(c.image_bytes), str(c.pages_written), _secs(c.freeze_s),
            _secs(c.dump_s), _secs(c.write_s), c.backend or "-", c.status.label,
        ))
    if len(rows) == 1:
        return "no checkpoints\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def plot_stats(store: "Store", job: str, png_path: str | Path) -> Path:
    """Plot image size, durations and (if recorded) dirty pages per mapping of `job`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpts = [c for c in store.list(job)]
    if not ckpts:
        from .errors import CheckpointNotFoundError
        raise CheckpointNotFoundError(f"job {job!r} has no checkpoints in store {store.root}: nothing to plot")
    t0 = min(c.time for c in ckpts)
    t = [(c.time - t0) / 60 for c in ckpts]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=False)
    ax = axes[0]
    ax.plot(t, [c.image_bytes / 2**20 for c in ckpts], "o-", label="image")
    ax.plot(t, [c.memory_bytes / 2**20 for c in ckpts], "s--", label="memory")
    ax.set_ylabel("MiB")
    ax.set_title(f"job {job}: {len(ckpts)} checkpoints")
    ax.legend()
    ax = axes[1]
    for field in ("freeze_s", "dump_s", "write_s"):
        ax.plot(t, [getattr(c, field) for c in ckpts], "o-", label=field)
    ax.set_ylabel("seconds")
    ax.set_xlabel("minutes since first checkpoint")
    ax.legend()
    ax = axes[2]
    newest = max(ckpts, key=lambda c: c.seq)
    arrays = store.catalog_arrays(job, newest.seq)
    if arrays:
        name, values = sorted(arrays.items())[0]
        ax.bar(range(len(values.ravel())), values.ravel())
        ax.set_title(f"{name} of checkpoint {newest.seq:08d}")
        ax.set_xlabel("index")
    else:
        ax.text(0.5, 0.5, "no per-checkpoint arrays recorded", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path
