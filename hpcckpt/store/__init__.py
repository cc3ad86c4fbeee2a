"""hpcckpt.store: image sets on a (possibly shared) file system, with an HDF5 catalog.

    store = Store(root)
    w = store.begin(job="name", generation=g, parent=None)   # engine writes into w.path
    ckpt = w.publish(meta)                                    # atomic, checksummed, fenced
    store.restore_candidate("name")                           # newest that verifies
    with store.materialize(ckpt) as path: restore(path)       # plain files (decompressed if need be)

See docs/store.md for the layout and why it is safe with many writers.
"""
from .codec import Compression
from .errors import (CatalogError, CheckpointNotFoundError, CorruptDataError, InvalidNameError, LockTimeoutError,
                     ManifestError, MaterializeError, NoRestorableCheckpointError, ParentMissingError,
                     ReservedFileNameError, StaleGenerationError, StoreConfigError, StoreError, WriterStateError)
from .materialize import TMPDIR_ENV, Materialized
from .model import Checkpoint, RetentionResult, Status
from .report import format_listing, plot_stats
from .retention import Entry, Plan, plan_retention
from .store import MergeFn, Store
from .writer import Writer

__all__ = [
    "Store", "Writer", "Checkpoint", "Status", "RetentionResult", "MergeFn", "Compression", "Materialized",
    "TMPDIR_ENV", "CorruptDataError", "MaterializeError", "StoreConfigError",
    "format_listing", "plot_stats", "plan_retention", "Entry", "Plan",
    "StoreError", "StaleGenerationError", "CheckpointNotFoundError", "ParentMissingError",
    "NoRestorableCheckpointError", "WriterStateError", "ReservedFileNameError", "LockTimeoutError",
    "CatalogError", "ManifestError", "InvalidNameError",
]
