"""Build-time check of the image's base: the Python, torch and compilers the pinned packages expect.

    python docker/check-image.py {gpu,cpu} [--constraints docker/constraints.txt]

A base image is pinned by tag (or digest) but its torch is not pinned by docker/constraints.txt (the
image brings it), so a base that ships another torch, another Python, a CUDA toolkit that does not
match torch's, or no C++ compiler fails the build here, naming what differs, instead of failing at
the first training step: DeepSpeed JIT-compiles its ops (fused Adam with nvcc on GPUs, CPU Adam
with offload_optimizer, the CPU comm op) with g++ on first use. Exit status 1 with one line per
problem, 0 when all hold.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

PYTHON = (3, 11)  # what docker/constraints.txt was resolved for


def pinned_torch(constraints: Path) -> str:
    pins = re.findall(r"^torch==(\S+)\s*$", constraints.read_text(), flags=re.M)
    if len(pins) != 1:
        raise SystemExit(f"{constraints}: expected one `torch==VERSION` line, found {len(pins)}")
    return pins[0]


def nvcc_release() -> str | None:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found and found.group(1)


def problems(variant: str, constraints: Path) -> list[str]:
    import torch

    found = []
    if sys.version_info[:2] != PYTHON:
        found.append(f"Python {sys.version.split()[0]}; {constraints} is resolved for {'.'.join(map(str, PYTHON))}")
    want = pinned_torch(constraints)
    have = torch.__version__.split("+")[0]
    if have != want:
        found.append(f"the base image has torch {torch.__version__}; {constraints} pins torch=={want}")
    if not shutil.which("g++"):
        found.append("no g++: DeepSpeed cannot JIT-compile its ops (use a base with a C++ compiler)")
    if variant == "gpu":
        if torch.version.cuda is None:
            found.append(f"torch {torch.__version__} is a CPU build; the GPU image needs a CUDA build")
        elif not shutil.which("nvcc"):
            found.append("no nvcc: DeepSpeed cannot JIT-compile fused Adam (use the base's -devel image)")
        else:
            release = nvcc_release()
            torch_cuda = ".".join(torch.version.cuda.split(".")[:2])
            if release != torch_cuda:
                found.append(f"nvcc is CUDA {release}, torch is built for CUDA {torch_cuda}: DeepSpeed refuses the mismatch")
    elif torch.version.cuda is not None:
        found.append(f"torch {torch.__version__} is a CUDA build; the CPU image installs the +cpu wheel")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=["gpu", "cpu"])
    parser.add_argument("--constraints", type=Path, default=Path("docker/constraints.txt"))
    args = parser.parse_args(argv)
    found = problems(args.variant, args.constraints)
    for line in found:
        print(f"check-image ({args.variant}): {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
