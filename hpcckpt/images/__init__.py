"""The image format: protobuf messages (hpcckpt.proto is the spec) plus raw page files."""
from . import hpcckpt_pb2 as pb

FORMAT_VERSION = 2          # written; 2 adds image chains (parents, in-parent page runs)
READABLE_VERSIONS = (1, 2)

__all__ = ["pb", "FORMAT_VERSION", "READABLE_VERSIONS"]
