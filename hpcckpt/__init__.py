"""hpcckpt: transparent checkpoint/restore of Linux processes for HPC batch jobs."""

__version__ = "0.1.0"
