"""The kernel interface: ptrace, /proc, syscall injection, per-architecture layouts.

Everything above this package talks to the kernel only through it, so the engine reads
like a description of what is saved, not of how the kernel is asked.
"""
