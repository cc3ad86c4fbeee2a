"""Packaging for hpcckpt: transparent checkpoint/restore of Linux processes for HPC jobs."""
from setuptools import find_packages, setup

setup(
    name="hpcckpt",
    version="0.1.0",
    description="Transparent checkpoint/restore of Linux processes for HPC batch jobs",
    python_requires=">=3.11",
    packages=find_packages(include=["hpcckpt", "hpcckpt.*"]),
    package_data={"hpcckpt.images": ["*.proto"]},
    install_requires=[
        "protobuf>=7.35",
        "python-ptrace>=0.9.9",
        "xxhash>=3.0",
        "numpy>=1.24",
        "h5py>=3.8",
        "matplotlib",  # hpcckpt stats
        "zstandard>=0.22",  # store compression
        "lz4>=4.0",
        "pyroute2>=0.9",  # network namespaces (engine/netns.py)
    ],
    extras_require={
        # pytest 9 keeps node ids where pytest-xdist 3.8 cannot tag them: --dist loadgroup
        # (scripts/test.sh) would not group
        "test": ["pytest>=7,<9", "pytest-timeout", "pytest-xdist", "hypothesis"],
        "bench": ["matplotlib"],   # benchmarks/*.py --png
        "slurm": ["pyslurm"],
    },
    entry_points={"console_scripts": ["hpcckpt=hpcckpt.cli:main",
                                      "hpcckptd=hpcckpt.service.daemon:main"]},
)
