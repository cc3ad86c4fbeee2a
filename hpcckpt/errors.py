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
    """The process to dump disappeared before or during the dump."""


class PermissionDeniedError(HpcckptError):
    """The caller may not dump or restore this process or image."""


class UnsupportedError(HpcckptError):
    """The process uses something the engine cannot checkpoint yet (names process, fd, kind)."""


class ImageError(HpcckptError):
    """An image set is missing, truncated, corrupt or of another format version."""


class RestoreError(HpcckptError):
    """The image is sound but this machine cannot give the process back what it had."""
