"""One exception hierarchy for hpcckpt.

Every error a user can meet derives from HpcckptError and carries a message that names
the process, file or image at fault and, where there is one, what to do about it. The CLI
prints the message and exits non-zero; it never shows a traceback for these.
"""


class HpcckptError(Exception):
    """Base of every error hpcckpt raises on purpose."""


class KernelError(HpcckptError):
    """A kernel interface (ptrace, /proc, a syscall) refused or failed."""


class ProcessGoneError(KernelError):
    """The process to dump disappeared before or during the dump.

    `wait_status` is its wait status when the wait that noticed the exit also collected
    it: a caller that is the process's parent cannot wait for it again.
    """

    def __init__(self, message: str, tid: int | None = None, wait_status: int | None = None):
        super().__init__(message)
        self.tid, self.wait_status = tid, wait_status


class PermissionDeniedError(HpcckptError):
    """The caller may not dump or restore this process or image."""


class UnsupportedError(HpcckptError):
    """The process uses something the engine cannot checkpoint yet (names process, fd, kind)."""


class ImageError(HpcckptError):
    """An image set is missing, truncated, corrupt or of another format version."""


class RestoreError(HpcckptError):
    """The image is sound but this machine cannot give the process back what it had."""
