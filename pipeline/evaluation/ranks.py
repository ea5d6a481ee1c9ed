"""Exact rank of every relevant item of every query, in one pass over the similarity matrix (CPU, numba).

Float32 GEMM blocks decide every score farther than their error bound from a threshold; the rest are recomputed in
float64; ties go to the lower index; a symmetric matrix is computed once per block. Details: docs/internals.md.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from tqdm.auto import tqdm

UNIT_ROUNDOFF = 2.0 ** -24


@njit(inline="always")
def _dot64(a, b):
    s = 0.0
    for t in range(a.shape[0]):
        s += np.float64(a[t]) * np.float64(b[t])
    return s


@njit(inline="always")
def _place(s, q, ref, Q, G, T, P, r, eps, hist, amb, row):
    """Score s of reference ``ref`` (a row of G) for query ``q`` (a row of Q): count it ahead of each relevant
    item of q that it beats.

    ``T[q]`` (descending) and ``P[q]`` are q's relevant items' exact scores and indices. ``hist[row, k]``
    counts items certainly ahead of relevant items k, k+1, ... (a cumulative sum finishes it);
    ``amb[row, k]`` those found ahead of item k alone after an exact recomputation.
    """
    k = r - 1  # thresholds ascend as k falls: most scores that pass ``lo`` beat only the lowest ones
    while k >= 0 and s > T[q, k] + eps:
        k -= 1
    if k < r - 1:
        hist[row, k + 1] += 1
    exact = np.nan
    while k >= 0 and s >= T[q, k] - eps:  # within the error bound: decide in float64
        if exact != exact:  # not computed yet
            exact = _dot64(Q[q], G[ref])
        if exact > T[q, k] or (exact == T[q, k] and ref < P[q, k]):
            amb[row, k] += 1
        k -= 1


@njit(parallel=True, cache=True)
def _scan(S, r0, c0, diag, both, Q, G, T, P, R, lo, eps, hist, amb, chist, camb, seed, best, barg, cbest, carg):
    """One block ``S = Q[r0:] @ G[c0:].T``: rows' queries vs columns, and (``both``) columns' queries vs rows.

    ``diag``: a diagonal block of the symmetric case, scanned above its diagonal only (no self pairs).
    Column-side results go to per-chunk buffers ``chist/camb/cbest/carg`` (no two threads write one cell).
    Along the way (symmetric case) each row's most similar *seed* row is kept: ``seed[j]`` is j's slot among
    the seeds, or -1 (``best/barg``: score and slot so far; ties go to the lower slot). These are the first
    assignment of k-means started from the seeds, which therefore needs no search of its own.
    """
    nb, nc = S.shape
    nch = chist.shape[0]
    step = (nb + nch - 1) // nch
    for ch in prange(nch):
        for a in range(ch * step, min(nb, (ch + 1) * step)):
            i = r0 + a
            lo_i = lo[i]
            best_i, barg_i = best[i], barg[i]
            seed_i = seed[i] if both else -1
            start = a + 1 if diag else 0
            for b in range(start, nc):
                s = S[a, b]
                j = c0 + b
                if s >= lo_i:
                    _place(s, i, j, Q, G, T, P, R[i], eps[i], hist, amb, i)
                if both:
                    if s >= lo[j]:
                        _place(s, j, i, G, Q, T, P, R[j], eps[j], chist[ch], camb[ch], b)
                    if s >= best_i and seed[j] >= 0 and (s > best_i or seed[j] < barg_i):
                        best_i, barg_i = s, seed[j]
                    if seed_i >= 0 and s >= cbest[ch, b] and (s > cbest[ch, b] or seed_i < carg[ch, b]):
                        cbest[ch, b], carg[ch, b] = s, seed_i
            best[i], barg[i] = best_i, barg_i


@njit(parallel=True, cache=True)
def _thresholds(Q, G, members, start, stop, self_search, T, P, R):
    """Each query's relevant items (``members[start[i]:stop[i]]``, itself excluded) and their exact scores."""
    for i in prange(Q.shape[0]):
        n = 0
        for m in range(start[i], stop[i]):
            p = members[m]
            if self_search and p == i:
                continue
            T[i, n] = _dot64(Q[i], G[p])
            P[i, n] = p
            n += 1
        R[i] = n


def search_inputs(query: np.ndarray, labels: np.ndarray, gallery: np.ndarray | None, gallery_labels: np.ndarray | None):
    """(self_search, Q, G, labels, reference labels): float32 contiguous embeddings, checked against their labels."""
    self_search = gallery is None
    Q = np.ascontiguousarray(query, dtype=np.float32)
    G = Q if self_search else np.ascontiguousarray(gallery, dtype=np.float32)
    labels = np.asarray(labels)
    ref_labels = labels if self_search else np.asarray(gallery_labels)
    if len(ref_labels) != len(G) or len(labels) != len(Q):
        raise ValueError(f"labels and embeddings differ in length ({len(labels)} vs {len(Q)}, "
                         f"{len(ref_labels)} vs {len(G)})")
    return self_search, Q, G, labels, ref_labels


def relevant_members(labels: np.ndarray, ref_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(members, start, stop, width): query i's class members are ``members[start[i]:stop[i]]`` (reference
    indices; empty where the class is absent); ``width`` is the largest class (at least 1)."""
    members = np.argsort(ref_labels, kind="stable").astype(np.int64)
    by_class = ref_labels[members]
    start = np.searchsorted(by_class, labels, side="left").astype(np.int64)
    stop = np.searchsorted(by_class, labels, side="right").astype(np.int64)
    return members, start, stop, max(int((stop - start).max(initial=0)), 1)


def relevant_items(labels: np.ndarray, ref_labels: np.ndarray, self_search: bool,
                   query: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, P, R): per query, its relevant items' exact scores (descending, ties by lower index), indices, count."""
    members, start, stop, width = relevant_members(labels, ref_labels)
    T = np.full((len(labels), width), -np.inf)
    P = np.full((len(labels), width), np.iinfo(np.int64).max, dtype=np.int64)
    R = np.zeros(len(labels), dtype=np.int64)
    _thresholds(query, ref, members, start, stop, self_search, T, P, R)
    order = np.lexsort((P, -T), axis=-1)
    return np.take_along_axis(T, order, -1), np.take_along_axis(P, order, -1), R


def relevant_ranks(*args, **kwargs):
    """See ``_relevant_ranks``. numba's OpenMP threading layer shares the OpenMP runtime with torch, and starting it
    raises the process's OpenMP thread count to every core: torch's own count is restored afterwards, or a training
    process that evaluates (rank 0's validation) would go on with more threads than it was given (oversubscribed,
    and summing in another order: the same seed would no longer give the same numbers)."""
    threads = torch.get_num_threads()
    try:
        return _relevant_ranks(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _relevant_ranks(query: np.ndarray, labels: np.ndarray, gallery: np.ndarray | None = None,
                   gallery_labels: np.ndarray | None = None, block: int = 4096, progress: bool = False,
                   seeds: np.ndarray | None = None, max_rank: int | None = None):
    """(ranks, R): ``ranks[i, k]`` is the 1-based rank of query i's k-th relevant item among its references.

    References are the other queries (``gallery=None``, the standard protocol) or the gallery. Columns
    ``k >= R[i]`` are padding. Ranks of one query's relevant items increase with k.

    ``max_rank``: the metrics need a rank only where it is at most ``max(max_rank, R)`` (the first relevant
    item: Recall@K up to that K, and MAP@R) or at most ``R`` (the others). Once a relevant item is known to
    rank beyond its cap it stops being tracked (its returned rank is only known to exceed the cap), so
    scores below it no longer take the slow path: most of the matrix is then one comparison per score.

    ``seeds`` (standard protocol only): sorted row indices; then (ranks, R, nearest) is returned, ``nearest[i]``
    the position in ``seeds`` of the seed row most similar to row i (itself, for a seed; ties: lower position).
    """
    self_search, Q, G, labels, ref_labels = search_inputs(query, labels, gallery, gallery_labels)
    T, P, R = relevant_items(labels, ref_labels, self_search, Q, G)
    q_norm = np.linalg.norm(Q.astype(np.float64), axis=1)
    g_norm = np.linalg.norm(G.astype(np.float64), axis=1)
    # GEMM error bound for any pair of query i (rows in the symmetric case are queries too: Q is G)
    eps = 2.0 * (Q.shape[1] + 2) * UNIT_ROUNDOFF * q_norm * g_norm.max(initial=0.0) + 1e-30
    rows = np.arange(len(Q))

    def lowest(live: np.ndarray, part=slice(None)) -> np.ndarray:
        """The scan's fast test per query: the score of its lowest still-tracked relevant item, less the bound."""
        return np.where(live > 0, T[rows[part], np.maximum(live - 1, 0)] - eps[part], np.inf)

    lo = lowest(R)
    hist = np.zeros(T.shape, dtype=np.int64)
    amb = np.zeros(T.shape, dtype=np.int64)
    # as many scan threads as torch uses (1 in a Ray worker that was given 1 CPU), not every core
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    nch = numba.get_num_threads()
    if seeds is not None and not self_search:
        raise ValueError("seeds: only for the standard protocol (no gallery)")
    slot = np.full(len(Q), -1, dtype=np.int64)
    if seeds is not None:
        slot[seeds] = np.arange(len(seeds))
    best = np.full(len(Q), -np.inf, dtype=np.float32)
    barg = np.full(len(Q), np.iinfo(np.int64).max, dtype=np.int64)
    caps = None
    if max_rank is not None:
        caps = np.broadcast_to(R[:, None], T.shape).copy()
        caps[:, 0] = np.maximum(R, max_rank)
    qt, gt = torch.from_numpy(Q), torch.from_numpy(G).T.contiguous()
    pairs = [(r0, c0) for r0 in range(0, len(Q), block) for c0 in range(r0 if self_search else 0, len(G), block)]
    for r0, c0 in tqdm(pairs, desc="rank relevant items", unit="block", disable=None if progress else True):
        S = torch.mm(qt[r0:r0 + block], gt[:, c0:c0 + block]).numpy()
        width = S.shape[1] if self_search else 1
        chist = np.zeros((nch, width, T.shape[1]), dtype=np.int64)
        camb = np.zeros_like(chist)
        cbest = np.full((nch, width), -np.inf, dtype=np.float32)
        carg = np.full((nch, width), np.iinfo(np.int64).max, dtype=np.int64)
        _scan(S, r0, c0, self_search and r0 == c0, self_search, Q, G, T, P, R, lo, eps, hist, amb, chist, camb,
              slot, best, barg, cbest, carg)
        if self_search:
            cols = slice(c0, c0 + S.shape[1])
            hist[cols] += chist.sum(axis=0)
            amb[cols] += camb.sum(axis=0)
            for ch in range(nch):  # merge the chunks' nearest seeds: higher score, then lower slot
                better = (cbest[ch] > best[cols]) | ((cbest[ch] == best[cols]) & (carg[ch] < barg[cols]))
                best[cols] = np.where(better, cbest[ch], best[cols])
                barg[cols] = np.where(better, carg[ch], barg[cols])
        if caps is not None:  # stop tracking relevant items known to rank beyond their cap (always a suffix)
            touched = [slice(r0, r0 + S.shape[0])] + ([slice(c0, c0 + S.shape[1])] if self_search and c0 != r0 else [])
            for part in touched:
                over = np.cumsum(hist[part], axis=1) + amb[part] >= caps[part]
                live = np.minimum(np.where(over.any(axis=1), over.argmax(axis=1), R[part]), R[part])
                lo[part] = lowest(live, part)
    ranks = np.cumsum(hist, axis=1) + amb + 1
    if seeds is None:
        return ranks, R
    own = np.einsum("ij,ij->i", Q[seeds], Q[seeds])  # the diagonal is not scanned: a seed's score with itself
    better = (own > best[seeds]) | ((own == best[seeds]) & (np.arange(len(seeds)) < barg[seeds]))
    barg[seeds] = np.where(better, np.arange(len(seeds)), barg[seeds])
    return ranks, R, barg


def per_query_from_ranks(ranks: np.ndarray, R: np.ndarray) -> dict[str, np.ndarray]:
    """Per query: ``first`` (rank of its first relevant item; a huge number without one), ``ap_at_r`` (its average
    precision at R; NaN without a relevant item) and ``r_precision`` (NaN likewise)."""
    first = np.where(R > 0, ranks[:, 0], np.iinfo(np.int64).max)
    position = np.arange(1, ranks.shape[1] + 1)[None, :]
    r = np.maximum(R, 1)[:, None]
    within = (position <= r) & (ranks <= r) & (R[:, None] > 0)
    ap = np.where(within, position / np.maximum(ranks, 1), 0.0).sum(axis=1) / np.maximum(R, 1)
    rp = within.sum(axis=1) / np.maximum(R, 1)
    return {"first": first, "ap_at_r": np.where(R > 0, ap, np.nan), "r_precision": np.where(R > 0, rp, np.nan)}


def metrics_from_ranks(ranks: np.ndarray, R: np.ndarray, ks, per_query: bool = False):
    """Recall@K (every query counts; one with no relevant item misses), MAP@R, R-Precision and Precision@1
    (over queries with R > 0), from the ranks of each query's relevant items; with ``per_query``, also the
    per-query values (``per_query_from_ranks``)."""
    q = per_query_from_ranks(ranks, R)
    out = {f"recall_at_{k}": float((q["first"] <= k).mean()) for k in ks}
    valid = R > 0
    if not valid.any():
        out.update(map_at_r=float("nan"), r_precision=float("nan"), precision_at_1=float("nan"))
    else:
        out["map_at_r"] = float(q["ap_at_r"][valid].mean())
        out["r_precision"] = float(q["r_precision"][valid].mean())
        out["precision_at_1"] = float((q["first"][valid] == 1).mean())
    return (out, q) if per_query else out
