"""The image format: protobuf messages (hpcckpt.proto is the spec) plus raw page files."""
from . import hpcckpt_pb2 as pb

# written: 2 added image chains (parents, in-parent page runs); 3 added POSIX timers, file
# locks, eventfd/timerfd/signalfd/epoll, which a version-2 reader would silently drop
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

__all__ = ["pb", "FORMAT_VERSION", "READABLE_VERSIONS"]
