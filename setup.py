"""Builds fastrnn's compiled ops against torch's stable ABI (torch >= 2.10).

fastrnn._C (op schemas + CPU kernels) is always built. fastrnn._C_cuda (CUDA
kernels) is built when torch is a CUDA build and a CUDA toolkit is found,
whether or not a GPU is visible; FASTRNN_CUDA=0/1 overrides. With no GPU
visible the CUDA code targets sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST overrides).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def compile_flags():
    """{"common": [...], "cxx": [...], "nvcc": [...]} from csrc/compile_flags.txt."""
    flags = {}
    for line in (ROOT / CSRC / "compile_flags.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(":")
            flags[key.strip()] = value.split()
    return flags


def is_toolkit(home):
    return bool(home) and all(
        (Path(home) / p).exists() for p in ("bin/nvcc", "include/cuda_runtime.h")
    )


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else nvcc on PATH, else /usr/local/cuda: the first
    that is a whole toolkit (an nvcc wrapper in /usr/local/bin is not)."""
    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        str(Path(nvcc).resolve().parent.parent) if nvcc else None,
        "/usr/local/cuda",
    ]
    return next((c for c in candidates if is_toolkit(c)), None)


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # Set before torch.utils.cpp_extension guesses (it may pick a toolkit
    # without nvcc, e.g. one installed from pip wheels).
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    flag = os.environ.get("FASTRNN_CUDA")
    if flag in ("0", "1"):
        if flag == "1" and CUDA_HOME is None:
            raise RuntimeError("FASTRNN_CUDA=1 but no CUDA toolkit (nvcc) was found")
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
    flags = compile_flags()
    cxx = flags["cxx"] + flags["common"]
    exts = [
        CppExtension(
            "fastrnn._C",
            [f"{CSRC}/fastrnn.cpp", f"{CSRC}/cpu/backend.cpp", f"{CSRC}/cpu/cells_cpu.cpp",
             f"{CSRC}/python/module_cpu.cpp"],
            extra_compile_args={"cxx": cxx},
            py_limited_api=True,
        )
    ]
    if want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        exts.append(
            CUDAExtension(
                "fastrnn._C_cuda",
                [f"{CSRC}/cuda/backend.cu", f"{CSRC}/python/module_cuda.cpp"],
                extra_compile_args={
                    "cxx": cxx + ["-DUSE_CUDA"],
                    "nvcc": flags["nvcc"] + flags["common"] + ["-DUSE_CUDA"],
                },
                py_limited_api=True,
            )
        )
    return exts


class BuildExtensionWithoutDebugInfo(BuildExtension):
    """Python's own build flags carry -g; the C++ objects are built without debug information
    (an eighth of the size, and the CPU kernels compile in three quarters of the time) unless
    asked for with `build_ext --debug`."""

    def build_extensions(self):
        if not self.debug:
            for ext in self.extensions:
                ext.extra_compile_args["cxx"].append("-g0")
        super().build_extensions()


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionWithoutDebugInfo},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
