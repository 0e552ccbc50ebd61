"""Just-in-time build of the C++/CUDA extension (``dat_smt/ops/csrc``): the multi-scale deformable attention (MSDA)
kernels for CPU and CUDA, and the CPU inference kernels of DAT's window attention, of neighborhood attention, of
the depthwise convs with fused GELU and of LayerNorm over channels.

The sources ship inside the package and are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja)
into the torch extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), where later
processes find the cached library. The library name carries a digest of the sources, so installs of different
versions (or several checkouts) sharing one extensions directory never rebuild each other's. The first CPU build
takes about a minute on an idle 2-core machine; a cached load costs a fraction of a second (torch re-checks the sources
with ninja). Processes that build at the same time (DDP ranks) serialise on torch's lock (an OS advisory lock on
``<build dir>/lock``): one compiles, the others wait and then load the result. The CUDA kernels are compiled only
when CUDA is usable at runtime; otherwise the build is CPU-only, and a failed CUDA build falls back to a CPU-only
build.
Set ``DAT_SMT_DISABLE_EXTENSION=1`` to never build or load it, ``DAT_SMT_VERBOSE_BUILD=1`` to see the compiler
commands.
"""
import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["DISABLE_ENV", "extension_status", "load_extension"]

DISABLE_ENV = "DAT_SMT_DISABLE_EXTENSION"
CSRC_DIR = Path(__file__).resolve().with_name("csrc")
CPU_SOURCES = ("ms_deform_attn_binding.cpp", "ms_deform_attn_cpu.cpp", "neighborhood_attention_cpu.cpp",
               "window_attention_cpu.cpp", "depthwise_conv_cpu.cpp", "layer_norm_cpu.cpp")
CUDA_SOURCES = ("ms_deform_attn_cuda.cu",)

_lock = threading.Lock()
_status: dict = {}


def _build() -> dict:
    """Compiles and loads the extension; returns its status. Never raises."""
    if os.environ.get(DISABLE_ENV, "0").lower() not in ("", "0", "false", "no"):
        return {"cpu": False, "cuda": False, "reason": f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"}
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return {"cpu": False, "cuda": False, "reason": f"no C++ compiler ({compiler!r} not found on PATH)"}
    if not cpp_extension.is_ninja_available():
        return {"cpu": False, "cuda": False, "reason": "ninja is not installed (pip install ninja)"}
    cuda_reason = "CUDA is not available at runtime"
    if torch.cuda.is_available():
        if cpp_extension.CUDA_HOME is None:
            cuda_reason = "CUDA is available but no CUDA toolkit (nvcc) was found"
        else:
            error = _compile(cpp_extension, with_cuda=True)
            if error is None:
                return {"cpu": True, "cuda": True, "reason": None}
            cuda_reason = f"CUDA build failed: {error}"
    error = _compile(cpp_extension, with_cuda=False)
    if error is not None:
        return {"cpu": False, "cuda": False, "reason": f"build failed: {error}"}
    return {"cpu": True, "cuda": False, "reason": cuda_reason}


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _compile(cpp_extension, with_cuda: bool) -> str | None:
    """Builds (or finds in the cache) and loads one flavour of the extension; returns an error or None."""
    sources = [CSRC_DIR / name for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    try:
        cpp_extension.load(
            name=f"dat_smt_msda_{'cuda' if with_cuda else 'cpu'}_{_source_digest()}",
            sources=[str(source) for source in sources],
            extra_include_paths=[str(CSRC_DIR)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3"],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("DAT_SMT_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as error:  # noqa: BLE001 - any build/load failure means "fall back", with the reason kept
        lines = str(error).strip().splitlines()
        return lines[-1] if lines else type(error).__name__
    return None


def load_extension() -> dict:
    """Builds (first call only) and loads the extension.

    Returns:
        ``{"cpu": bool, "cuda": bool, "reason": str | None}``: which kernels are available and, if some are not,
        why. The build is attempted once per process; failures are remembered, not retried.
    """
    with _lock:
        if not _status:
            _status.update(_build())
        return dict(_status)


@torch.compiler.assume_constant_result
def extension_status(device_type: str) -> bool:
    """Whether the extension has kernels for ``device_type`` ("cpu" or "cuda"); a constant under torch.compile."""
    return bool(load_extension().get(device_type, False))
