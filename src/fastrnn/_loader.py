"""Loads the compiled ops: a clear error when they cannot load, never a silent fallback."""

import importlib
import os

import torch

REBUILD = "reinstall fastrnn from its source folder: pip install --force-reinstall --no-deps ."
_HERE = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = (2, 10)
cuda_loaded = False  # set by load_ops()


def _torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def load_ops():
    """Imports fastrnn._C (CPU) and, when torch has CUDA, fastrnn._C_cuda.

    Returns True (and sets ``cuda_loaded``) when the CUDA kernels are loaded.
    """
    global cuda_loaded
    if _torch_version() < MIN_TORCH:
        raise ImportError(
            f"fastrnn needs torch >= {'.'.join(map(str, MIN_TORCH))} (it is built on torch's "
            f"stable ABI), found torch {torch.__version__}"
        )
    try:
        importlib.import_module("fastrnn._C")
    except ImportError as e:
        raise ImportError(
            f"fastrnn's compiled ops (fastrnn._C) could not be loaded from {_HERE}: {e}. "
            f"Were they built? To build and install them, {REBUILD}"
        ) from e
    if torch.version.cuda is None:
        return False  # a CPU-only torch cannot load the CUDA library; CPU ops work
    try:
        importlib.import_module("fastrnn._C_cuda")
    except ModuleNotFoundError:
        return False  # built without CUDA kernels: CUDA inputs get a clear error
    except ImportError as e:
        raise ImportError(
            f"fastrnn's CUDA kernels (fastrnn._C_cuda) could not be loaded under torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}): {e}. To rebuild them, {REBUILD}"
        ) from e
    cuda_loaded = True
    return True
