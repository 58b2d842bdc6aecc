"""Packaging. The Triton sources live in the top-level `kernels/` folder and are installed
as `fastortho.kernels` (package_dir mapping), never as a top-level `kernels` module.

The CUDA extension (`csrc/`, module `fastortho._C`) is built here only when torch is importable
in the build environment (`pip install --no-build-isolation ...`), torch has CUDA, a CUDA
toolkit is found (CUDA_HOME) and FASTORTHO_SKIP_CUDA_BUILD is not 1. Otherwise it is built
lazily on first CUDA use (fastortho/ops/cuda_ext.py), from the sources shipped as package
data (fastortho/csrc). TORCH_CUDA_ARCH_LIST picks the
architectures; MAX_JOBS defaults to half the cores."""
import glob
import importlib.util
import os

from setuptools import setup

kwargs = {}


def _cuda_extension():
    if os.environ.get("FASTORTHO_SKIP_CUDA_BUILD") == "1":
        return None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # build isolation: no torch here; the extension is built lazily instead
        return None
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    if torch.version.cuda is None or not home:
        return None
    os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("CUDA_HOME", home)
    # header paths (pip CUDA wheels) and link flags (cuBLAS: the very library torch loaded) come
    # from the JIT builder's module, loaded by path: importing the fastortho package here would
    # import its dependencies
    spec = importlib.util.spec_from_file_location("_fastortho_cuda_ext", "fastortho/ops/cuda_ext.py")
    cuda_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_ext)
    ext = cpp_extension.CUDAExtension(
        "fastortho._C", sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp")),
        include_dirs=cuda_ext.include_dirs(), extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O2"]},
        extra_link_args=cuda_ext.link_flags())
    return ext, cpp_extension.BuildExtension


built = _cuda_extension()
if built is not None:
    kwargs = {"ext_modules": [built[0]], "cmdclass": {"build_ext": built[1]}}

setup(
    packages=["fastortho", "fastortho.ops", "fastortho.ops.orthoreg", "fastortho.ops.lora", "fastortho.ops.dual",
              "fastortho.train", "fastortho.commands", "fastortho.kernels", "fastortho.csrc"],
    package_dir={"fastortho": "fastortho", "fastortho.kernels": "kernels", "fastortho.csrc": "csrc"},
    # The extension's sources travel in the wheel (fastortho/csrc), so the lazy JIT build works
    # from any install, not only from a source tree.
    package_data={"fastortho.csrc": ["*.cu", "*.cpp", "*.h", "*.md"]},
    **kwargs,
)
