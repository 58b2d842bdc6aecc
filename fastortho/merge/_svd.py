"""Batched thin SVDs for the SVD-based merge methods.

torch solves a batch of SVDs one matrix after another on every device: on a CPU with every
thread on each matrix, on a GPU with one cuSOLVER ``gesvdj`` call after another on one stream,
each a long run of small kernels and a host synchronization (its convergence check), which
leaves most of the GPU idle. Here a batch is split into slices solved at once by
``FASTORTHO_SVD_WORKERS`` threads: on a GPU each thread drives its own CUDA stream (default 8),
solving its matrices one at a time, so that the temporaries (torch copies each input and
returns full factors) are a few matrices' rather than the batch's. On a CPU (measured on the
2-core CI machine, MKL, ViT-B-32 shapes; bench/NOTES.md):

- LAPACK's SVD does half its work in level-2 BLAS and scales poorly with threads (2 threads:
  1.3-1.7x one). Independent matrices scale with the threads instead, so a batch is split into
  one slice per thread (default: torch's thread count), each solved single-threaded.
- MKL's ``gesdd`` takes twice as long on a wide matrix (768 x 3072) as on its transpose: wide
  matrices are solved transposed.
- A tall matrix (rows >= 2 x columns) whose top singular triplets only are needed (TSV-M's
  and Iso-CTS's per-task ones) is reduced by Householder QR first, ``x = QR``; the SVD of the
  small ``R`` gives the singular values and right vectors, and Q is applied to the kept left
  vectors only. ``gesdd`` does the same reduction but forms Q and multiplies all of ``U``.
  A tall matrix's polar factor is ``Q (U_R V_R^T)`` the same way (Q applied once, to the
  small product, instead of forming Q, then U, then ``U V^T``).

All of these are the same LAPACK algorithms in the same precision as one ``torch.linalg.svd``
call: results agree with it to round-off (tests/test_merge.py).

LAPACK's float32 ``gesdd`` can fail to converge on matrices with many repeated (zero) singular
values, which Iso-CTS makes by projecting the common subspace out of each task (FusionBench's
Iso-CTS fails there on ViT-B-32 shapes): a batch that fails is solved again in float64 and
rounded back.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

from .. import _config

Triplets = tuple[Tensor, Tensor, Tensor]
# CUDA streams solving a batch at once unless FASTORTHO_SVD_WORKERS says otherwise
CUDA_STREAMS = 8

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_side_streams: dict[int, list] = {}  # device index -> the streams the workers use there


def svd(x: Tensor) -> Triplets:
    """Thin SVD ``u, s, vh`` of each matrix of a batch ``[..., m, n]``."""
    return top_svd(x, min(x.shape[-2:]))


def top_svd(x: Tensor, rank: int) -> Triplets:
    """The top ``rank`` singular triplets of each matrix of a batch: ``u [..., m, rank]``,
    ``s [..., rank]`` (descending), ``vh [..., rank, n]``."""
    return _float64_if_it_fails(lambda a: _top_svd(a, rank), x)


def polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor ``U V^T`` of each matrix of a batch (FusionBench's
    re-orthogonalization of concatenated singular vectors)."""
    return polar_and_values(x)[0]


def polar_and_values(x: Tensor) -> tuple[Tensor, Tensor]:
    """``U V^T`` and the singular values ``s`` of each matrix of a batch. On a CPU a tall
    matrix's factor is ``Q (U_R V_R^T)`` from its Householder QR, Q applied once."""
    return _float64_if_it_fails(_polar, x)


def _float64_if_it_fails(solve: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor) -> tuple[Tensor, ...]:
    try:
        return solve(x)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        return tuple(t.to(x.dtype) for t in solve(x.double()))


def _lapack_routes(x: Tensor) -> bool:
    """Whether ``x`` takes the CPU's LAPACK routes (transposes, QR reductions, batched slices);
    elsewhere each matrix is one plain SVD. (Tests run the plain arrangement on a CPU too.)"""
    return x.device.type == "cpu"


def _top_svd(x: Tensor, rank: int) -> Triplets:
    m, n = x.shape[-2:]
    if not _lapack_routes(x):
        return _solved_in_slices(x, [(m, rank), (rank,), (rank, n)],
                                 _one_at_a_time(lambda a, outs: _top_thin(a, rank, *outs)))
    if m < n:  # solved as its transpose (see the module docstring)
        u, s, vh = _top_svd(x.mT, rank)
        return vh.mT, s, u.mT
    solve = _top_by_qr if m >= 2 * n and rank < n else _top_thin
    return _solved_in_slices(x, [(m, rank), (rank,), (rank, n)], lambda a, outs: solve(a, rank, *outs))


def _polar(x: Tensor) -> tuple[Tensor, Tensor]:
    m, n = x.shape[-2:]
    if not _lapack_routes(x):
        return _solved_in_slices(x, [(m, n), (min(m, n),)], _one_at_a_time(lambda a, outs: _polar_thin(a, *outs)))
    if m < n:
        p, s = _polar(x.mT)
        return p.mT, s
    solve = _polar_by_qr if m >= 2 * n else _polar_thin
    return _solved_in_slices(x, [(m, n), (n,)], lambda a, outs: solve(a, *outs))


def _solved_in_slices(x: Tensor, shapes: list[tuple[int, ...]], solve: Callable[[Tensor, list[Tensor]], None],
                      ) -> tuple[Tensor, ...]:
    """Outputs of the given per-matrix ``shapes`` for the batch ``x [..., m, n]``, filled by
    ``solve(matrices, outputs)`` on one slice of the batch per worker."""
    flat = x.reshape(-1, *x.shape[-2:])
    outs = [flat.new_empty(flat.shape[0], *shape) for shape in shapes]

    def solve_slice(lo: int, hi: int) -> None:
        solve(flat[lo:hi], [o[lo:hi] for o in outs])

    if x.device.type == "cuda":
        _per_stream_slices(solve_slice, flat.shape[0], x.device)
    elif x.device.type == "cpu":
        _per_thread_slices(solve_slice, flat.shape[0])
    else:
        solve_slice(0, flat.shape[0])
    return tuple(o.reshape(*x.shape[:-2], *shape) for o, shape in zip(outs, shapes))


def _one_at_a_time(solve: Callable[[Tensor, list[Tensor]], None]) -> Callable[[Tensor, list[Tensor]], None]:
    """``solve`` called on one matrix of a slice after another (torch would loop over them
    anyway; this way its copies and full factors exist for one matrix at a time)."""
    def each(x: Tensor, outs: list[Tensor]) -> None:
        for i in range(x.shape[0]):
            solve(x[i:i + 1], [o[i:i + 1] for o in outs])
    return each


def _svd_of_r(x: Tensor) -> tuple[Tensor, Tensor, Triplets]:
    """Householder QR of tall matrices (``x = Q R``, Q as reflectors) and the SVD of R."""
    reflectors, tau = torch.geqrf(x)
    return reflectors, tau, torch.linalg.svd(reflectors[..., :x.shape[-1], :].triu(), full_matrices=False)


def _polar_thin(x: Tensor, p: Tensor, s: Tensor) -> None:
    u, sf, vh = torch.linalg.svd(x, full_matrices=False)
    torch.matmul(u, vh, out=p)
    s.copy_(sf)


def _polar_by_qr(x: Tensor, p: Tensor, s: Tensor) -> None:
    reflectors, tau, (ur, sr, vhr) = _svd_of_r(x)
    s.copy_(sr)
    p.zero_()
    torch.matmul(ur, vhr, out=p[..., :x.shape[-1], :])
    p.copy_(torch.ormqr(reflectors, tau, p))  # Q [U_R V_R^T; 0]


def _top_thin(x: Tensor, rank: int, u: Tensor, s: Tensor, vh: Tensor) -> None:
    if rank == min(x.shape[-2:]):
        torch.linalg.svd(x, full_matrices=False, out=(u, s, vh))
        return
    uf, sf, vhf = torch.linalg.svd(x, full_matrices=False)
    u.copy_(uf[..., :rank])
    s.copy_(sf[..., :rank])
    vh.copy_(vhf[..., :rank, :])


def _top_by_qr(x: Tensor, rank: int, u: Tensor, s: Tensor, vh: Tensor) -> None:
    reflectors, tau, (ur, sr, vhr) = _svd_of_r(x)
    s.copy_(sr[..., :rank])
    vh.copy_(vhr[..., :rank, :])
    u.zero_()
    u[..., :x.shape[-1], :] = ur[..., :rank]
    u.copy_(torch.ormqr(reflectors, tau, u))  # Q [U_R; 0]


def _slices(batch: int, workers: int) -> list[tuple[int, int]]:
    bounds = [batch * i // workers for i in range(workers + 1)]
    return list(zip(bounds, bounds[1:]))


def _in_threads(jobs: list[Callable[[], None]]) -> None:
    """Every job on its own thread of a shared pool; all have finished before the first
    failure is raised (so that the batch can be solved again)."""
    global _pool, _pool_size
    if _pool_size < len(jobs):
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(len(jobs), thread_name_prefix="fastortho-svd"), len(jobs)
    futures = [_pool.submit(job) for job in jobs]
    wait(futures)
    for future in futures:
        future.result()


def _per_thread_slices(solve: Callable[[int, int], None], batch: int) -> None:
    """``solve(lo, hi)`` on contiguous slices of the batch, one per worker thread, each
    single-threaded. torch's thread setting is process-wide: it is restored at once, and
    nothing else should run torch on the CPU meanwhile."""
    before = torch.get_num_threads()
    threads = min(_config.svd_workers() or before, batch)
    if threads < 2:
        solve(0, batch)
        return
    torch.set_num_threads(1)
    try:
        _in_threads([lambda lo=lo, hi=hi: solve(lo, hi) for lo, hi in _slices(batch, threads)])
    finally:
        torch.set_num_threads(before)


def _per_stream_slices(solve: Callable[[int, int], None], batch: int, device: torch.device) -> None:
    """``solve(lo, hi)`` on contiguous slices of the batch, each on its own thread and CUDA
    stream. The side streams start after everything the caller's stream has queued (the inputs
    and the outputs were made there), and the caller's stream waits for all of them, so the
    result is used, and its memory reused, only after it is written."""
    streams = min(_config.svd_workers() or CUDA_STREAMS, batch)
    if streams < 2:
        solve(0, batch)
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _side_streams.setdefault(index, [])
    while len(side) < streams:
        side.append(torch.cuda.Stream(device=index))
    main = torch.cuda.current_stream(index)
    ready = main.record_event()

    def on_stream(stream, lo: int, hi: int) -> None:
        with torch.cuda.device(index), torch.cuda.stream(stream):
            stream.wait_event(ready)
            solve(lo, hi)

    try:
        _in_threads([lambda s=stream, lo=lo, hi=hi: on_stream(s, lo, hi)
                     for stream, (lo, hi) in zip(side, _slices(batch, streams))])
    finally:
        for stream in side[:streams]:
            main.wait_stream(stream)
