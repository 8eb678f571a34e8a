"""Low-rank decomposition math for the `lowrank` pass: no graph, only numpy.

Each `Decomposition` computes its SVD (or HOSVD) once and then answers, for any rank,
the kept energy, the relative weight error and the factors, in the weight layout the
rewrite writes into the graph:

- `MatrixSVD`: W (K x N) of `y = x W` ~= A (K x r) B (r x N); the truncated SVD
  W = U S V^T gives A = U_r and B = S_r V_r^T.
- `ChannelSVD`: Conv W (Cout, Cin, *k) as (Cout, Cin*prod(k)) = U S V^T: a k x k conv
  Cin -> r with V_r^T, then a 1 x 1 conv r -> Cout with U_r S_r.
- `SpatialSVD`: Conv W (Cout, Cin, kh, kw) as (Cin*kh, Cout*kw) = U S V^T: a kh x 1
  conv Cin -> r with U_r, then a 1 x kw conv r -> Cout with S_r V_r^T.
- `Tucker2`: HOSVD of W along its two channel modes: a 1 x 1 conv Cin -> r_in
  (U_in^T), a k x k conv r_in -> r_out (the core), a 1 x 1 conv r_out -> Cout (U_out).
- `DataAwareSVD`: like `MatrixSVD` but minimising ||X W - X A B|| for calibration
  inputs X, given X^T X: A B = W Q_r Q_r^T with Q the eigenvectors of W^T X^T X W.

Singular values go on the second factor (the one applied last) everywhere. In int8
form both weights are quantized per output channel, which absorbs any per-channel
scale of either factor, but the intermediate activation h = x A is quantized per
tensor. With A = U_r its channels all have the scale of x (for the data-aware split
exactly unit RMS on the calibration inputs), so one per-tensor step fits all of them;
with sqrt(S) or S on A the channels range over sqrt(s_1/s_r) or s_1/s_r and the small
ones lose resolution. The output error of quantizing h with step D is D^2 sum ||B_i||^2:
s_1^(2a) sum s_i^(2-2a) for S^a on A, smallest at a = 0. Tucker-2's core carries the
scale, both 1 x 1 factors stay orthonormal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChannelSVD",
    "DataAwareSVD",
    "Decomposition",
    "Factors",
    "MatrixSVD",
    "SpatialSVD",
    "Tucker2",
    "max_rank",
]


@dataclass(frozen=True)
class Factors:
    """The factor weights of one decomposition at one rank, in application order."""

    form: str
    rank: tuple[int, ...]
    weights: tuple[np.ndarray, ...]
    energy: float  # kept fraction of the energy the decomposition minimises
    weight_error: float  # ||W - W'||_F / ||W||_F


def _cast(w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`w` in the weight's dtype with subnormal values flushed to zero: factors of
    rank-deficient weights carry values below the dtype's smallest normal, and x86 CPUs
    multiply subnormals many times slower (a split PP-OCRv4 rec ran up to 1.9x slower)."""
    out = np.ascontiguousarray(w).astype(dtype)
    out[np.abs(out) < np.finfo(out.dtype).tiny] = 0
    return out


def _svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)


def _tail_error(s: np.ndarray, r: int, total: float) -> float:
    """sqrt(sum of discarded s^2) / ||W||: Eckart-Young's error of the rank-r SVD."""
    if total <= 0:
        return 0.0
    return math.sqrt(max(float(np.sum(s[r:] ** 2)), 0.0)) / math.sqrt(total)


def _energy(s: np.ndarray, r: int) -> float:
    total = float(np.sum(s**2))
    return 1.0 if total <= 0 else float(np.sum(s[:r] ** 2)) / total


def max_rank(form: str, shape: tuple[int, ...]) -> int:
    """The largest rank `form` allows for a weight of `shape` (layer layout)."""
    if form == "svd":
        return min(shape)
    cout, cin, *k = shape
    if form == "channel":
        return min(cout, cin * math.prod(k))
    if form == "spatial":
        return min(cin * k[0], cout * k[1])
    if form == "tucker2":  # r_out; r_in is at most min(Cin, Cout * prod(k))
        return min(cout, cin * math.prod(k))
    raise ValueError(form)


class Decomposition:
    """One layer's weight in one form; `factors(rank)` is cheap after construction."""

    form: str
    full_rank: int

    def energy(self, rank: tuple[int, ...]) -> float:
        raise NotImplementedError

    def error(self, rank: tuple[int, ...]) -> float:
        """The relative error the decomposition minimises (weight, or output for data)."""
        raise NotImplementedError

    def factors(self, rank: tuple[int, ...]) -> Factors:
        raise NotImplementedError


class _SVDForm(Decomposition):
    """Shared by the forms that are one truncated SVD of a reshaped weight."""

    def __init__(self, matrix: np.ndarray, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.u, self.s, self.vt = _svd(matrix)
        self.total = float(np.sum(self.s**2))
        self.full_rank = len(self.s)

    def energy(self, rank: tuple[int, ...]) -> float:
        return _energy(self.s, rank[0])

    def error(self, rank: tuple[int, ...]) -> float:
        return _tail_error(self.s, rank[0], self.total)

    def _parts(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(U_r, S_r V_r^T): singular values on the second factor."""
        return self.u[:, :r], self.s[:r, None] * self.vt[:r]

    def factors(self, rank: tuple[int, ...]) -> Factors:
        (r,) = rank
        if not 1 <= r <= self.full_rank:
            raise ValueError(f"rank {r} outside 1..{self.full_rank}")
        weights = tuple(_cast(w, self.dtype) for w in self._layout(*self._parts(r)))
        return Factors(self.form, rank, weights, self.energy(rank), self.error(rank))

    def _layout(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError


class MatrixSVD(_SVDForm):
    """W (K x N) of y = x W -> (A (K x r), B (r x N))."""

    form = "svd"

    def __init__(self, w: np.ndarray) -> None:
        super().__init__(w, w.dtype)

    def _layout(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        return a, b


class ChannelSVD(_SVDForm):
    """Conv W (Cout, Cin, *k) -> (k conv (r, Cin, *k), 1x1 conv (Cout, r, 1...))."""

    form = "channel"

    def __init__(self, w: np.ndarray) -> None:
        self.shape = w.shape
        super().__init__(w.reshape(w.shape[0], -1), w.dtype)

    def _parts(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        # W_mat = U S V^T with y = W_mat x: V^T is applied first, U S second.
        return self.vt[:r], self.u[:, :r] * self.s[:r]

    def _layout(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, ...]:
        cout, cin, *k = self.shape
        r = first.shape[0]
        ones = [1] * len(k)
        return first.reshape(r, cin, *k), second.reshape(cout, r, *ones)


class SpatialSVD(_SVDForm):
    """Conv W (Cout, Cin, kh, kw) -> (kh x 1 conv (r, Cin, kh, 1), 1 x kw conv (Cout, r, 1, kw))."""

    form = "spatial"

    def __init__(self, w: np.ndarray) -> None:
        cout, cin, kh, kw = w.shape
        self.shape = w.shape
        # M[(c, i), (o, j)] = W[o, c, i, j]
        super().__init__(w.transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw), w.dtype)

    def _layout(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        cout, cin, kh, kw = self.shape
        r = a.shape[1]
        first = a.T.reshape(r, cin, kh, 1)
        second = b.reshape(r, cout, kw).transpose(1, 0, 2)[:, :, None, :]
        return np.ascontiguousarray(first), np.ascontiguousarray(second)


class Tucker2(Decomposition):
    """HOSVD of Conv W (Cout, Cin, *k) on both channel modes; rank = (r_in, r_out)."""

    form = "tucker2"

    def __init__(self, w: np.ndarray) -> None:
        self.dtype = w.dtype
        self.shape = w.shape
        w64 = np.asarray(w, np.float64)
        cout, cin = w.shape[:2]
        self.u_out = _svd(w64.reshape(cout, -1))[0]  # (Cout, min(Cout, Cin k k))
        self.u_in = _svd(np.swapaxes(w64, 0, 1).reshape(cin, -1))[0]  # (Cin, ...)
        # the core in the full bases: its leading block is the core at any rank pair
        core = np.tensordot(self.u_out.T, w64, axes=(1, 0))
        self.core = np.moveaxis(np.tensordot(self.u_in.T, core, axes=(1, 1)), 0, 1)
        self.total = float(np.sum(w64**2))
        # kept energy of every (r_out, r_in) block: 2-D cumulative sums of squares
        sq = np.sum(self.core**2, axis=tuple(range(2, w.ndim)))
        self.kept = np.cumsum(np.cumsum(sq, axis=0), axis=1)
        self.full_rank = self.u_out.shape[1]

    def _kept(self, rank: tuple[int, ...]) -> float:
        r_in, r_out = rank
        return float(self.kept[r_out - 1, r_in - 1])

    def energy(self, rank: tuple[int, ...]) -> float:
        return 1.0 if self.total <= 0 else self._kept(rank) / self.total

    def error(self, rank: tuple[int, ...]) -> float:
        # orthogonal projections on both modes: ||W - W'||^2 = ||W||^2 - ||core block||^2
        if self.total <= 0:
            return 0.0
        return math.sqrt(max(self.total - self._kept(rank), 0.0) / self.total)

    def factors(self, rank: tuple[int, ...]) -> Factors:
        r_in, r_out = rank
        if not (1 <= r_in <= self.u_in.shape[1] and 1 <= r_out <= self.u_out.shape[1]):
            raise ValueError(f"rank {rank} outside the weight's")
        ones = [1] * (len(self.shape) - 2)
        first = self.u_in[:, :r_in].T.reshape(r_in, self.shape[1], *ones)
        core = self.core[:r_out, :r_in]
        last = self.u_out[:, :r_out].reshape(self.shape[0], r_out, *ones)
        weights = tuple(_cast(w, self.dtype) for w in (first, core, last))
        return Factors(self.form, rank, weights, self.energy(rank), self.error(rank))

    def reconstruct(self, rank: tuple[int, ...]) -> np.ndarray:
        """W' = core x_0 U_out x_1 U_in (float64)."""
        r_in, r_out = rank
        core = self.core[:r_out, :r_in]
        w = np.tensordot(self.u_out[:, :r_out], core, axes=(1, 0))
        return np.moveaxis(np.tensordot(self.u_in[:, :r_in], w, axes=(1, 1)), 0, 1)


class DataAwareSVD(Decomposition):
    """W (K x N) minimising ||X W - X A B||_F, given the input Gram matrix X^T X.

    The best rank-r product is W Q_r Q_r^T, Q the eigenvectors of W^T X^T X W (the
    principal directions of the outputs on the data). A = W Q_r diag(sqrt(m) / sigma)
    makes each channel of h = x A unit RMS on the data; B = diag(sigma / sqrt(m)) Q_r^T.
    `energy`/`error` are of the outputs on the data; `Factors.weight_error` of W.
    """

    form = "svd"

    def __init__(self, w: np.ndarray, gram: np.ndarray, rows: int) -> None:
        self.dtype = w.dtype
        self.w = np.asarray(w, np.float64)
        # Q and sigma from the SVD of C^(1/2) W (K x N), C = X^T X: the eigenvectors of
        # W^T C W without forming that N x N matrix (N is 6625 for a CTC head)
        gram = np.asarray(gram, np.float64)
        values, vectors = np.linalg.eigh((gram + gram.T) / 2)
        root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        _, sigma, qt = np.linalg.svd(root @ self.w, full_matrices=False)
        self.sigma2 = sigma**2
        self.q = qt.T
        self.rows = max(int(rows), 1)
        self.full_rank = min(self.w.shape)
        self.total = float(np.sum(self.sigma2))
        self.w_norm2 = float(np.sum(self.w**2))

    def energy(self, rank: tuple[int, ...]) -> float:
        return 1.0 if self.total <= 0 else float(np.sum(self.sigma2[: rank[0]])) / self.total

    def error(self, rank: tuple[int, ...]) -> float:
        return math.sqrt(max(1.0 - self.energy(rank), 0.0))

    def factors(self, rank: tuple[int, ...]) -> Factors:
        (r,) = rank
        q = self.q[:, :r]
        rms = np.sqrt(self.sigma2[:r] / self.rows)
        scale = np.where(rms > 1e-12 * max(float(rms.max(initial=0.0)), 1e-300), rms, 1.0)
        a = (self.w @ q) / scale
        b = scale[:, None] * q.T
        err = float(np.linalg.norm(self.w - a @ b))
        rel = err / math.sqrt(self.w_norm2) if self.w_norm2 > 0 else 0.0
        weights = (_cast(a, self.dtype), _cast(b, self.dtype))
        return Factors(self.form, rank, weights, self.energy(rank), rel)
