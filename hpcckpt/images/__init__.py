"""The image format: protobuf messages (hpcckpt.proto is the spec) plus raw page files."""
from . import hpcckpt_pb2 as pb

FORMAT_VERSION = 1

__all__ = ["pb", "FORMAT_VERSION"]
