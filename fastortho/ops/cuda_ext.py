"""The optional CUDA C++ extension (``csrc/``): ahead of time as ``fastortho._C`` under
``pip install --no-build-isolation -e .`` when torch has CUDA and ``CUDA_HOME`` is set, otherwise
built lazily with ninja on first CUDA use (cached by torch's extension cache, one log line).
``import fastortho`` never builds and never fails without CUDA: only :func:`load` does, and
only when asked.

Environment: ``FASTORTHO_SKIP_CUDA_BUILD=1`` (never build), ``TORCH_CUDA_ARCH_LIST`` (target
architectures, e.g. "9.0"), ``MAX_JOBS`` (parallel compile jobs; default half the cores).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .._config import cuda_build_disabled

log = logging.getLogger("fastortho")

_state: dict[str, object] = {}


def sources() -> list[str]:
    """The extension's source files: the installed copy (``fastortho/csrc``, package data of a
    wheel) or the repository's (``csrc/`` beside the package, an editable install)."""
    here = Path(__file__).resolve().parents[1]
    for root in (here / "csrc", here.parent / "csrc"):
        files = sorted(str(p) for p in root.glob("*.cu")) + sorted(str(p) for p in root.glob("*.cpp"))
        if files:
            return files
    return []


def cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


# Library headers ATen's CUDA context includes; a full toolkit has them, a minimal one (nvcc
# and the runtime only, as on the CI machines) does not.
_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def include_dirs() -> list[str]:
    """Header directories to add: none when the toolkit has the library headers, else those of
    the pip CUDA wheels (site-packages/nvidia/*/include), which match the torch in use."""
    home = cuda_home()
    if home and all((Path(home) / "include" / h).exists() for h in _LIBRARY_HEADERS):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += [str(p) for p in sorted(Path(base).glob("cu*/include"))]
        dirs += [str(p) for p in sorted(Path(base).glob("*/include")) if (p / "cublas_v2.h").exists()]
    return sorted(set(dirs))


def cublas_library() -> str | None:
    """The cuBLAS shared library to link (the Gram's symmetric rank-k update calls cuBLAS
    directly): the one this process's torch has loaded, so that both bind to one library and
    torch's handle is valid in our calls; else the toolkit's or a pip wheel's."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if Path(path).name.startswith("libcublas.so"):
                    return path
    except OSError:  # not Linux
        pass
    roots = [Path(h) / "lib64" for h in (cuda_home(),) if h]
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        roots += sorted(Path(base).glob("*/lib"))
    for root in roots:
        found = sorted(root.glob("libcublas.so*"))
        if found:
            return str(found[0])
    return None


def link_flags() -> list[str]:
    """Linker inputs of the extension: the toolkit's lib64 (cudart) and the cuBLAS library."""
    flags = [f"-L{Path(cuda_home() or '/usr/local/cuda') / 'lib64'}"]
    cublas = cublas_library()
    return flags + ([cublas] if cublas else ["-lcublas"])


def _aot_module():
    """The spec of the ahead-of-time module ``fastortho._C`` when this install has one."""
    import importlib.util

    return importlib.util.find_spec("fastortho._C")


def _import_aot() -> None:
    from .. import _C  # noqa: F401  (its shared library registers the ops)


def build(verbose: bool = False) -> str:
    """Load the extension's ops, building them first if needed; returns which copy is loaded:
    "aot" (``fastortho._C``, built at install) or "jit" (ninja build, cached by torch).

    One copy per process, whatever the order of calls: when the install has the ahead-of-time
    module, that is what is loaded, and nothing is ever JIT-built beside it (two copies register
    the same ``TORCH_LIBRARY_FRAGMENT`` ops twice, which terminates the process; docs/design.md
    section 7). Raises RuntimeError with the reason when neither can be had."""
    if _state.get("copy"):
        return _state["copy"]
    if _aot_module() is not None:
        try:
            _import_aot()
            _state["copy"] = "aot"
            return "aot"
        except ImportError as e:  # its library did not load (e.g. built for another torch): no op registered
            log.warning("fastortho: the ahead-of-time CUDA extension does not load (%s); building it instead", e)
    import torch
    from torch.utils import cpp_extension

    if cuda_build_disabled():
        raise RuntimeError("the CUDA extension is disabled (FASTORTHO_SKIP_CUDA_BUILD=1)")
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the directory holding bin/nvcc")
    srcs = sources()
    if not srcs:
        raise RuntimeError("the extension sources (csrc/) are not installed")
    os.environ.setdefault("CUDA_HOME", home)
    # torch resolves its CUDA_HOME when cpp_extension is imported (from nvcc on PATH, which can
    # be a /usr/local/bin symlink): point it at the toolkit so that -lcudart resolves.
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))
    # One line, so that minutes of compiling are never silent (torch's file lock makes a second
    # process wait for a build in progress, then load its result).
    where = build_directory()
    log.warning("fastortho: building the CUDA extension (first use, a few minutes; cached in %s)", where)
    cpp_extension.load(name="fastortho_cuda", sources=srcs, extra_include_paths=include_dirs(),
                       extra_cflags=["-O2"], extra_cuda_cflags=["-O2"], verbose=verbose,
                       extra_ldflags=link_flags(), is_python_module=False, build_directory=where)
    _state["copy"] = "jit"
    return "jit"


def build_directory() -> str:
    """The JIT build's folder, one per torch version (under torch's extension cache, which is
    keyed by Python and CUDA version only). Two torch versions must not share one: a library
    built against one torch's headers does not load into another, and their build locks differ
    (torch 2.11 treats an existing ``lock`` file as held; newer torch leaves that file behind
    after an OS-level lock), so an older torch waits forever on a newer one's folder."""
    import torch
    from torch.utils import cpp_extension

    version = "".join(ch if ch.isalnum() else "_" for ch in torch.__version__)
    return cpp_extension._get_build_directory(f"fastortho_cuda_torch{version}", verbose=False)


def load() -> bool:
    """Make the ``fastortho::`` CUDA ops available (:func:`build`: the AOT module, else a JIT
    build), once; False (with the reason in :func:`error`) when that is impossible here."""
    if "ok" in _state:
        return bool(_state["ok"])
    try:
        build()
        _state["ok"] = True
    except Exception as e:  # noqa: BLE001 - any build or import failure means "not available"
        _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
    if _state["ok"]:
        _register_python_side()
    return bool(_state["ok"])


def error() -> str | None:
    return _state.get("error")  # type: ignore[return-value]


def _register_python_side() -> None:
    """Fake kernels of the C++ ops (once); their autograd is ops/orthoreg/cuda_backend.py."""
    if _state.get("registered"):
        return
    import torch

    @torch.library.register_fake("fastortho::ortho_penalty_grouped")
    def _(weights, bases, squared, gram="gemm"):
        return weights[0].new_empty(len(weights), dtype=torch.float32), [torch.empty_like(w) for w in weights]

    _state["registered"] = True
