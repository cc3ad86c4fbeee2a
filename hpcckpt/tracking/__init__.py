"""Dirty-page tracking: which pages a process wrote since the last checkpoint.

Backends share one interface (base.Tracker): uffd_wp (userfaultfd write-protect,
Linux 6.7+), soft_dirty (CONFIG_MEM_SOFT_DIRTY kernels) and hashing (everywhere).
select.choose() picks the best that works here. See docs/tracking.md.
"""
from .base import Dirty, Tracker, TrackingError, TrackingLostError
from .hashing import HashingTracker
from .soft_dirty import SoftDirtyTracker
from .uffd_wp import UffdWpTracker

__all__ = ["Dirty", "Tracker", "TrackingError", "TrackingLostError", "HashingTracker",
           "SoftDirtyTracker", "UffdWpTracker"]
