"""The rank engine in torch (a GPU or any device): the same definition and bit-identical numbers as
``evaluation.ranks``, with candidates filtered per block first. Details: docs/internals.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.evaluation.ranks import UNIT_ROUNDOFF, relevant_members, search_inputs

_PAIRS_PER_CHUNK = 1 << 18


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Full float32 GEMM (no TF32): the error bound assumes it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def exact_dots(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float64 ``a[rows[p]] . b[cols[p]]`` for every pair p, summed over the dimensions in order."""
    out = torch.empty(len(rows), dtype=torch.float64, device=a.device)
    for start in range(0, len(rows), _PAIRS_PER_CHUNK):
        r, c = rows[start:start + _PAIRS_PER_CHUNK], cols[start:start + _PAIRS_PER_CHUNK]
        x = a[r].double().T.contiguous()  # (d, pairs): each dimension's values contiguous
        y = b[c].double().T.contiguous()
        acc = torch.zeros(len(r), dtype=torch.float64, device=a.device)
        for t in range(x.shape[0]):
            acc.addcmul_(x[t], y[t])
        out[start:start + len(r)] = acc
    return out


def _float32_above(x: torch.Tensor) -> torch.Tensor:
    """The smallest float32 >= each float64 value."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _float32_below(x: torch.Tensor) -> torch.Tensor:
    """The largest float32 <= each float64 value."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def relevant_ranks_torch(query: np.ndarray, labels: np.ndarray, gallery: np.ndarray | None = None,
                         gallery_labels: np.ndarray | None = None, device: str | torch.device = "cuda",
                         block_rows: int = 4096, block_cols: int = 65536, progress: bool = False,
                         candidates_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, R) exactly as ``evaluation.ranks.relevant_ranks`` gives them, computed on ``device``.

    ``ranks[i, k]`` is the 1-based rank of query i's k-th relevant item (columns ``k >= R[i]`` are padding).
    ``candidates_first=False``: every score against every slot's thresholds (the engine before the candidate
    filter, kept as the benchmark's peer and the tests' reference).
    """
    device = torch.device(device)
    self_search, Q, G, labels, ref_labels = search_inputs(query, labels, gallery, gallery_labels)
    members, start, stop, width = relevant_members(labels, ref_labels)
    n = len(Q)
    q = torch.from_numpy(Q).to(device)
    g = q if self_search else torch.from_numpy(G).to(device)

    # Relevant items of every query, their exact scores, sorted descending (ties: lower index first).
    counts = stop - start
    pair_rows = np.repeat(np.arange(n), counts)
    offsets = np.arange(len(pair_rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_cols = members[np.repeat(start, counts) + offsets]
    if self_search:
        keep = pair_cols != pair_rows
        pair_rows, pair_cols = pair_rows[keep], pair_cols[keep]
    R = np.bincount(pair_rows, minlength=n).astype(np.int64)
    rows_t = torch.from_numpy(pair_rows).to(device)
    cols_t = torch.from_numpy(pair_cols).to(device)
    scores = exact_dots(q, g, rows_t, cols_t)
    slot = torch.from_numpy(np.arange(len(pair_rows)) - np.repeat(np.cumsum(R) - R, R)).to(device)
    T = torch.full((n, width), float("-inf"), dtype=torch.float64, device=device)
    P = torch.full((n, width), np.iinfo(np.int64).max, dtype=torch.int64, device=device)
    T[rows_t, slot] = scores
    P[rows_t, slot] = cols_t
    order = torch.from_numpy(np.lexsort((P.cpu().numpy(), -T.cpu().numpy()), axis=-1)).to(device)
    T, P = torch.gather(T, 1, order), torch.gather(P, 1, order)

    R_t = torch.from_numpy(R).to(device)
    live = torch.arange(width, device=device)[None, :] < R_t[:, None]
    q_norm = torch.linalg.vector_norm(q.double(), dim=1)
    g_max = torch.linalg.vector_norm(g.double(), dim=1).max() if len(g) else torch.tensor(0.0, device=device)
    eps = 2.0 * (Q.shape[1] + 2) * UNIT_ROUNDOFF * q_norm * g_max + 1e-30
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=device)
    hi = torch.where(live, _float32_above(T + eps[:, None]), inf)  # beyond: certainly ahead of slot k
    lo = torch.where(live, _float32_below(T - eps[:, None]), inf)  # below: certainly not ahead

    ahead = torch.zeros((n, width), dtype=torch.int64, device=device)
    floor = lo.min(dim=1).values  # a score below a row's lowest threshold is neither ahead of nor near any slot

    def scan(S: torch.Tensor, r0: int, c0: int, by_column: bool = False) -> None:
        """Count the items ahead of each relevant one for the queries of the block S's rows (r0..) against its
        columns (c0..); ``by_column``: for the queries of its columns against its rows (the transposed block,
        read in place)."""
        r1, c1 = r0 + S.shape[0], c0 + S.shape[1]
        if not candidates_first:
            band = torch.zeros_like(S, dtype=torch.bool)
            for k in range(width):
                ahead[r0:r1, k] += (S > hi[r0:r1, k:k + 1]).sum(dim=1)
                band |= (S >= lo[r0:r1, k:k + 1]) & (S <= hi[r0:r1, k:k + 1])
            local_rows, local_cols = band.nonzero(as_tuple=True)  # what is left: the band, recomputed exactly below
        elif by_column:
            local_rows, local_cols = (S >= floor[None, c0:c1]).nonzero(as_tuple=True)  # one pass over the block
        else:
            local_rows, local_cols = (S >= floor[r0:r1, None]).nonzero(as_tuple=True)
        for p0 in range(0, len(local_rows), _PAIRS_PER_CHUNK):  # then only the candidates, slot by slot
            lr, lc = local_rows[p0:p0 + _PAIRS_PER_CHUNK], local_cols[p0:p0 + _PAIRS_PER_CHUNK]
            s = S[lr, lc][:, None]
            rows, cols = (lc + c0, lr + r0) if by_column else (lr + r0, lc + c0)  # (query, item)
            if candidates_first:
                ahead.index_add_(0, rows, (s > hi[rows]).long())
            within = (s >= lo[rows]) & (s <= hi[rows])
            near = within.any(dim=1)
            if not near.any():
                continue
            rows, cols, within = rows[near], cols[near], within[near]
            exact = exact_dots(q, g, rows, cols)[:, None]
            beats = (exact > T[rows]) | ((exact == T[rows]) & (cols[:, None] < P[rows]))
            ahead.index_add_(0, rows, (within & beats).long())

    # A query set searched against itself has a symmetric score matrix: each square block off the diagonal is
    # computed once and scanned for its rows' queries and, in place, for its columns' (square blocks, as many scores).
    symmetric = self_search and candidates_first
    if symmetric:
        side = block_rows = block_cols = math.isqrt(block_rows * block_cols)
        blocks = [(r0, c0) for r0 in range(0, n, side) for c0 in range(r0, n, side)]
    else:
        blocks = [(r0, c0) for r0 in range(0, n, block_rows) for c0 in range(0, len(G), block_cols)]
    with _ieee_float32_matmul():
        for r0, c0 in tqdm(blocks, desc="rank relevant items", unit="block", disable=None if progress else True):
            r1, c1 = min(n, r0 + block_rows), min(len(G), c0 + block_cols)
            S = q[r0:r1] @ g[c0:c1].T
            if self_search and r0 < c1 and c0 < r1:  # a query is not its own reference
                own = torch.arange(max(r0, c0), min(r1, c1), device=device)
                S[own - r0, own - c0] = float("-inf")
            scan(S, r0, c0)
            if symmetric and c0 != r0:
                scan(S, r0, c0, by_column=True)
    return (ahead + 1).cpu().numpy(), R
