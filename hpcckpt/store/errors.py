"""Errors of the image store.

Each message names the job, checkpoint or file at fault and says what to do, because the
person reading it is usually an operator looking at a failed restart at 3 a.m.
"""
from hpcckpt.errors import HpcckptError


class StoreError(HpcckptError):
    """Base of every error the image store raises on purpose."""


class InvalidNameError(StoreError):
    """A job name that cannot be used as a directory name in the store."""


class StaleGenerationError(StoreError):
    """A writer of an older generation of a job tried to begin or publish.

    This is the fence against two live copies of one job (a node cut off from the network
    keeps running while Slurm restarts the job elsewhere): the older copy must not publish.
    """

    def __init__(self, message: str, job: str, generation: int, newest: int) -> None:
        super().__init__(message)
        self.job = job
        self.generation = generation
        self.newest = newest


class CheckpointNotFoundError(StoreError):
    """A checkpoint that was asked for by job and sequence number does not exist."""


class ParentMissingError(StoreError):
    """An incremental checkpoint names a parent that is not (or no longer) in the store."""


class NoRestorableCheckpointError(StoreError):
    """Every checkpoint of a job failed verification, or the job has none."""

    def __init__(self, message: str, job: str, damaged: dict[int, list[str]]) -> None:
        super().__init__(message)
        self.job = job
        self.damaged = damaged


class WriterStateError(StoreError):
    """A Writer was used after publish() or abort(), or its staging directory vanished."""


class ReservedFileNameError(StoreError):
    """The engine wrote a file whose name the store reserves for its own bookkeeping."""


class LockTimeoutError(StoreError):
    """A store lock could not be taken in time (another process holds it)."""


class CatalogError(StoreError):
    """The HDF5 catalog is unreadable; it is derived data and `rebuild` recreates it."""


class ManifestError(StoreError):
    """A checkpoint's manifest is missing, unparsable or fails its own digest."""


class StoreConfigError(StoreError):
    """The store's settings (STORE.json) are unknown, unreadable, or conflict with what was asked."""


class CorruptDataError(StoreError):
    """Stored bytes do not decode, or decode to something other than what was published."""


class MaterializeError(StoreError):
    """A checkpoint could not be turned into plain files for the engine (space, permissions)."""
