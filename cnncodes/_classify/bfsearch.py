"""Exact k-nearest-neighbour search with a bfloat16 first pass and a float64 re-ranking.

A CPU with native bfloat16 units (AVX-512 BF16, AMX) multiplies bfloat16 matrices about 4x
faster than float32 ones, and a flat search is one matrix product. Rounding the codes to
bfloat16 would change some neighbours, so the product only *proposes* candidates:

1. The codes are centred (distances do not change) and rounded to bfloat16; two extra
   columns carry ``-||x||^2 / 2`` as a bfloat16 pair (high and low part), so one product
   gives the score ``s = <q, x> - ||x||^2 / 2`` (larger is nearer; ``||q - x||^2 =
   ||q||^2 - 2 s``), and a top-``kp`` of each row gives the candidates. For an inner
   product the score is ``<q, x - mu>``, which ranks the codes as ``<q, x>`` does.
2. Every score carries a proven error bound: the rounding of the inputs (measured per row,
   through Cauchy-Schwarz), the float32 accumulation, the rounding of the output to
   bfloat16, and the float32 centring.
3. The candidates are re-ranked by their float64 distances to the original float32 codes.
   A query is *certified* when its k-th re-ranked distance is strictly below the smallest
   distance any code outside its candidates can have under the bound; its neighbours are
   then exactly those of a float64 brute-force search.
4. Queries that are not certified are searched again with more candidates, and at last by
   a float64 brute-force pass over all codes.

So the result never depends on the bfloat16 rounding; only the speed does.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

U32 = 2.0 ** -24  # unit roundoff of float32
U16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
# Output of the bfloat16 product is rounded to nearest: |fl - t| <= C_OUT * |fl|.
C_OUT = U16 / (1 - U16)
SAFETY = 1.01  # headroom on the bound for the float64 arithmetic that evaluates it
# Candidates per query: the first pass keeps n_neighbors + EXTRA, a second pass over the
# queries that were not certified keeps RETRY times as many.
EXTRA = 8
RETRY = 3
# Queries scored at a time: 256 x 50,000 bfloat16 scores (25 MB) ran the product fastest;
# fewer for larger code sets, so that a block holds at most BLOCK_ENTRIES scores.
BLOCK_QUERIES = 256
BLOCK_ENTRIES = 1 << 24
# Queries re-ranked at a time: their candidate rows in float64 stay in the CPU's caches
# (32: 0.11 s for 10,000 queries x 13 candidates x 1280, against 0.14 s by 64, 0.16 s by 4).
RERANK_QUERIES = 32
# Rows of the codes converted to float64 at a time in the brute-force fallback.
FALLBACK_ROWS = 8192
# Rows of the codes rounded to bfloat16 at a time when the index is built: the block's
# passes stay in the CPU's caches (50,000 x 1280 codes: 0.12 s, against 0.29 s by 8192).
BUILD_ROWS = 2048
# The top-kp of a row of scores is taken in two steps: the maxima of TOP_GROUPS interleaved
# column groups, then the members of the kp best groups (about twice as fast as torch.topk
# over the whole row, which ran at a quarter of the memory bandwidth).
TOP_GROUPS = 16


@contextlib.contextmanager
def torch_threads(n_threads: int | None):
    """Run the block with torch using n_threads intra-op threads, then restore the count."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def top_scores(S: torch.Tensor, kp: int):
    """The kp largest entries of each row of S and their columns, in no particular order.

    What ``torch.topk(S, kp, dim=1, sorted=False)`` gives (up to the order of the columns
    among equal scores), in two cheap passes. Group ``c`` holds the columns ``c, c + w,
    c + 2w, ...`` (w = n // TOP_GROUPS; the last n - w * TOP_GROUPS columns join the first
    groups), so the group maxima are elementwise maxima of contiguous slices. The kp best
    groups hold kp distinct entries no smaller than any entry of another group, so the kp
    largest of their members are the kp largest of the row.
    """
    b, n = S.shape
    w = n // TOP_GROUPS
    if w < max(kp, TOP_GROUPS) or S.stride(1) != 1:
        return torch.topk(S, kp, dim=1, sorted=False)
    main = S.as_strided((b, TOP_GROUPS, w), (S.stride(0), w, 1))
    group_max = main.amax(1)
    tail = S[:, w * TOP_GROUPS:]  # fewer than TOP_GROUPS <= w columns
    group_max[:, :tail.shape[1]] = torch.maximum(group_max[:, :tail.shape[1]], tail)
    groups = torch.topk(group_max, kp, dim=1, sorted=False).indices
    # the members of the chosen groups; the last one exists only for the first n - w * G
    cols = (groups[:, :, None] + w * torch.arange(TOP_GROUPS + 1)).reshape(b, -1)
    outside = cols >= n
    values = S.gather(1, cols.masked_fill(outside, 0)).masked_fill_(outside, -float("inf"))
    top, j = torch.topk(values, kp, dim=1, sorted=False)
    return top, cols.gather(1, j)


class BFloat16Flat:
    """An exact flat index over float32 rows: bfloat16 candidates, float64 answers.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32, C-contiguous
        The codes; kept by reference (not copied).
    metric : {"l2", "ip"}
        Squared Euclidean distance, or inner product (larger is nearer).
    """

    def __init__(self, X: np.ndarray, metric: str):
        if metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', not {metric!r}")
        self.metric = metric
        X = np.ascontiguousarray(X, dtype=np.float32)
        self.X = torch.from_numpy(X)
        n, d = self.X.shape
        l2 = metric == "l2"
        # Centring makes the scores (and so their rounding errors) small next to the gaps
        # between distances. Any float32 vector will do: the bound below covers the rounding
        # of the subtraction. For an inner product only the codes are centred: <q, x - mu>
        # ranks the codes as <q, x> does, shifted by <q, mu> per query.
        self.mu = self.X.mean(0) if n else torch.zeros(d)
        m = d + (2 if l2 else 0)
        self.Xb = torch.empty(n, m, dtype=torch.bfloat16)
        # Norms computed in float32 are within gamma_m of the truth: inflate them by INFLATE.
        inflate = 1 + 2 * (m + 2) * U32
        a_max = e_max = b_max = h_max = c_max = 0.0
        for s in range(0, n, BUILD_ROWS):
            xc = self.X[s:s + BUILD_ROWS] - self.mu
            xb = xc.to(torch.bfloat16)
            # bf16(v) and v are within a factor 2 of each other: their difference is exact.
            xbf = xb.float()
            b_max = max(b_max, float(torch.linalg.vector_norm(xbf, dim=1).max()) * inflate)
            err = torch.linalg.vector_norm(xbf.sub_(xc), dim=1).double() * inflate
            norm_c = torch.linalg.vector_norm(xc, dim=1).double() * inflate
            self.Xb[s:s + len(xc), :d] = xb
            if l2:
                half = 0.5 * norm_c ** 2  # >= ||xc||^2 / 2, within 2 * inflate - 2 of it
                hi = half.to(torch.bfloat16)
                lo = (half - hi.double()).to(torch.bfloat16)
                # |column pair - ||x - mu||^2 / 2|: the split, the float32 norm, the centring
                h = (half - hi.double() - lo.double()).abs() + (4 * (m + 2) + 4) * U32 * half
                h_max = max(h_max, float(h.max()))
                c_max = max(c_max, float((hi.double().abs() + lo.double().abs()).max()))
                self.Xb[s:s + len(xc), d] = -hi
                self.Xb[s:s + len(xc), d + 1] = -lo
            # ||x - mu|| (exact) <= ||xc|| (1 + U32): one rounding per entry of the subtraction.
            a_max = max(a_max, float(norm_c.max()) * (1 + 2 * U32))
            e_max = max(e_max, float((err + U32 * norm_c).max()) * (1 + 2 * U32))
        # a: ||x - mu||, e: ||bf16 row - (x - mu)||, b: ||bf16 row|| (code columns), h: the
        # error of the norm column pair, c: its size; each the largest over the rows.
        self.a_max, self.e_max, self.b_max, self.h_max, self.c_max = a_max, e_max, b_max, h_max, c_max
        # Accumulation: at most gamma_m (sum |q_i x_i|) in float32, m = number of columns.
        self.gamma = m * U32 / (1 - m * U32)
        # ||x||^2 of the original rows in float64, for the re-ranking.
        self.sq = torch.from_numpy(np.einsum("ij,ij->i", X, X, dtype=np.float64)) if l2 else None
        self.stats = {"queries": 0, "retried": 0, "brute_force": 0}

    # ------------------------------------------------------------------ search

    def search(self, Q: np.ndarray, k: int):
        """Return (D, I): float64 squared distances (or inner products) and int64 rows, nearest first."""
        Q = torch.from_numpy(np.ascontiguousarray(Q, dtype=np.float32))
        n, k = self.X.shape[0], int(k)
        D = torch.empty(len(Q), k, dtype=torch.float64)
        I = torch.empty(len(Q), k, dtype=torch.int64)
        block = max(1, min(BLOCK_QUERIES, BLOCK_ENTRIES // max(n, 1)))
        left = []
        # One buffer for every block's scores: a fresh 25 MB block each time cost up to
        # 0.35 s of page faults per 10,000 queries.
        buffer = torch.empty(min(block, len(Q)) * n, dtype=torch.bfloat16)
        with torch.inference_mode():
            for s in range(0, len(Q) if k + EXTRA < n else 0, block):
                q = Q[s:s + block]
                S, E = self._scores(q, buffer[:len(q) * n].view(len(q), n))
                todo = torch.arange(len(q))
                self.stats["queries"] += len(q)
                for kp in (k + EXTRA, RETRY * (k + EXTRA)):
                    if len(todo) == 0 or kp >= n:
                        break
                    if kp > k + EXTRA:
                        self.stats["retried"] += len(todo)
                    # every row still to do: no copy of the block's scores
                    part = (S, E, q) if len(todo) == len(q) else (S[todo], E[todo], q[todo])
                    d, i, ok = self._certified(*part, k, kp)
                    D[s + todo[ok]], I[s + todo[ok]] = d[ok], i[ok]
                    todo = todo[~ok]
                left.append(s + todo)
            rest = torch.cat(left) if left else torch.arange(len(Q))
            if len(rest):
                self.stats["brute_force"] += len(rest)
                D[rest], I[rest] = self._brute_force(Q[rest], k)
        return D.numpy(), I.numpy()

    def _scores(self, q: torch.Tensor, out: torch.Tensor | None = None):
        """bfloat16 scores of a block of queries (into out), and each query's bound E on their error.

        For every score, ``|fl - s| <= C_OUT |fl| + E`` (see the module docstring).
        """
        d = self.X.shape[1]
        qc = q - self.mu if self.metric == "l2" else q
        qb = qc.to(torch.bfloat16)
        if self.metric == "l2":
            qb = torch.cat([qb, torch.ones(len(qb), 2, dtype=torch.bfloat16)], 1)
        S = torch.matmul(qb, self.Xb.T, out=out)
        norm_q = torch.linalg.vector_norm(qc, dim=1, dtype=torch.float64) * (1 + 2 * U32)
        qbf = qb[:, :d].float()
        e_q = torch.linalg.vector_norm(qbf - qc, dim=1, dtype=torch.float64) + U32 * norm_q
        norm_qb = torch.linalg.vector_norm(qbf, dim=1, dtype=torch.float64)
        # input rounding (Cauchy-Schwarz), float32 accumulation of sum |q_i x_i| (the norm
        # columns meet ones), the norm columns' own error
        E = (e_q * self.a_max + norm_q * self.e_max + e_q * self.e_max
             + self.gamma * (norm_qb * self.b_max * (1 + 2 * d * U32) + self.c_max) + self.h_max) * SAFETY + 1e-30
        return S, E

    def _certified(self, S, E, q, k: int, kp: int):
        """Top-k of queries from their kp best bfloat16 scores, and which of them are certified."""
        top, cand = top_scores(S, kp)
        floor = top.min(1).values.double()  # no code outside the candidates scored higher
        cand = torch.sort(cand, dim=1).values  # equal distances: the lower row first, as brute force
        # The largest true score a code outside the candidates can have.
        bound = floor + C_OUT * floor.abs() + E
        exact = self._exact(q, cand)
        if self.metric == "l2":
            d, o = torch.sort(exact, dim=1, stable=True)
            # ||q - x||^2 = ||q - mu||^2 - 2 s: the smallest distance outside the candidates.
            b2 = ((q.double() - self.mu.double()) ** 2).sum(1)
            beyond = b2 - 2 * bound
            kth = d[:, k - 1]
            ok = kth < beyond - 1e-12 * (b2 + 2 * bound.abs() + kth)
        else:
            d, o = torch.sort(exact, dim=1, stable=True, descending=True)
            # the largest inner product outside the candidates: <q, x - mu> + <q, mu>
            shift = q.double() @ self.mu.double()
            beyond = bound + shift
            kth = d[:, k - 1]
            ok = kth > beyond + 1e-12 * (bound.abs() + shift.abs() + kth.abs() + E)
        return d[:, :k], torch.gather(cand, 1, o[:, :k]), ok

    def _exact(self, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """float64 squared distances (l2) or inner products (ip) of each query to its candidates."""
        out = torch.empty(cand.shape, dtype=torch.float64)
        for s in range(0, len(q), RERANK_QUERIES):  # small blocks stay in cache: ~4x faster
            c, qd = cand[s:s + RERANK_QUERIES], q[s:s + RERANK_QUERIES].double()
            rows = self.X.index_select(0, c.reshape(-1)).view(*c.shape, -1).double()
            dot = torch.bmm(rows, qd[:, :, None])[:, :, 0]
            out[s:s + RERANK_QUERIES] = dot if self.metric == "ip" else (
                (qd * qd).sum(1, keepdim=True) + self.sq[c] - 2 * dot)
        return out

    def _brute_force(self, q: torch.Tensor, k: int):
        """float64 search over every code: the answer for queries the bound cannot certify.

        Blocks of queries against blocks of codes, keeping each block's k best (a stable
        sort: equal distances keep the lower row first), so memory stays bounded.
        """
        D = torch.empty(len(q), k, dtype=torch.float64)
        I = torch.empty(len(q), k, dtype=torch.int64)
        ip = self.metric == "ip"
        for a in range(0, len(q), BLOCK_QUERIES):
            qd = q[a:a + BLOCK_QUERIES].double()
            best_d, best_i = [], []
            for s in range(0, self.X.shape[0], FALLBACK_ROWS):
                x = self.X[s:s + FALLBACK_ROWS].double()
                dot = qd @ x.T
                full = dot if ip else (qd * qd).sum(1, keepdim=True) + self.sq[s:s + len(x)] - 2 * dot
                d, i = torch.sort(full, dim=1, stable=True, descending=ip)
                best_d.append(d[:, :k])
                best_i.append(i[:, :k] + s)
            d, o = torch.sort(torch.cat(best_d, 1), dim=1, stable=True, descending=ip)
            D[a:a + len(qd)], I[a:a + len(qd)] = d[:, :k], torch.gather(torch.cat(best_i, 1), 1, o[:, :k])
        return D, I
