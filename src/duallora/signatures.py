"""Task signatures: class statistics that predict an image's task with a confidence.

method.md, "Inference: one forward pass" and "Learning task t", step 7. For one feature site (the
mean token entering an adapted layer, or the backbone's final feature) we keep, per seen class, its
mean, and a pooled within-class scatter over all classes so far; only statistics, never images.

Task posterior (``score="mahalanobis"``, the default)::

    d_c(x)   = (z - mu_c)^T (S + ridge I)^{-1} (z - mu_c) / D     squared Mahalanobis, per dimension
    d_j(x)   = min over classes c of task j of d_c(x)
    p(j | x) = softmax_j(-d_j(x) / tau)

with S the pooled within-class covariance and ridge = ``ridge * tr(S) / D`` (numerical stability
only). With ``shrinkage="oas"`` S is first shrunk toward a scaled identity,
``S <- (1 - rho) S + rho tr(S) / D I``, with the Oracle Approximating Shrinkage coefficient rho of
:func:`oas_coefficient` (estimated from S and its degrees of freedom: near 0 with many images per
dimension, near 1 with few; docs/method.md, "Covariance shrinkage"). ``shrinkage="auto"`` applies it only
while the pooled covariance rests on fewer than :data:`AUTO_OAS_BELOW` degrees of freedom per dimension
(images minus classes, < 2 D), and none above (chosen on validation data, docs/method.md).
Options: ``cosine`` (d_c = 1 - cos(z, mu_c)) and ``subspace`` (d_j = 1 - ||Q_j^T z||^2/||z||^2
with Q_j the top-q eigenvectors of task j's feature second moment).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from duallora import distributed

SCORES = ("mahalanobis", "cosine", "subspace")
#: ``shrinkage`` values of :class:`TaskSignatures`.
SHRINKAGES = ("none", "oas", "auto")
#: ``shrinkage="auto"`` shrinks (OAS) while the pooled covariance's degrees of freedom (images minus
#: classes) are below this many per dimension: on the three validation splits of docs/method.md
#: ("Covariance shrinkage") OAS helped at 0.2-1.2 per dimension (small data) and cost 0.4-1.2 points
#: at 3 and more (the two benchmarks with hundreds of images per class).
AUTO_OAS_BELOW = 2.0


def oas_coefficient(cov: torch.Tensor, n: int) -> float:
    """Oracle Approximating Shrinkage coefficient rho in [0, 1] of a sample covariance.

    Chen, Wiesel, Eldar and Hero, "Shrinkage Algorithms for MMSE Covariance Estimation", IEEE Trans.
    Signal Processing 58(10), 2010, Eq. (23)::

        rho = min(1, ((1 - 2/p) tr(S^2) + tr(S)^2) / ((n + 1 - 2/p) (tr(S^2) - tr(S)^2 / p)))

    Args:
        cov: S (p, p), a symmetric sample covariance.
        n: the number of independent samples (degrees of freedom) behind it, >= 1.

    Returns:
        rho (1.0 when S is already a multiple of the identity, where the denominator is 0).

    Raises:
        ValueError: ``cov`` not square or ``n < 1``.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = cov.shape[0]
    cov = cov.to(torch.float64)
    tr = float(torch.trace(cov))
    tr2 = float((cov * cov).sum())  # tr(S^2) for a symmetric S
    den = (n + 1.0 - 2.0 / p) * (tr2 - tr * tr / p)
    if den <= 0.0:
        return 1.0
    return min(1.0, ((1.0 - 2.0 / p) * tr2 + tr * tr) / den)


class TaskSignatures:
    """Class means, pooled within-class covariance and per-task subspaces for one feature site.

    Args:
        dim: D, the feature width.
        score: ``mahalanobis`` | ``cosine`` | ``subspace``.
        tau: temperature of the task posterior (> 0).
        ridge: ridge relative to the mean eigenvalue of the pooled covariance.
        subspace_dims: q, directions per task for ``score="subspace"``.
        shrinkage: ``none`` | ``oas`` | ``auto``: shrink the pooled covariance toward a scaled identity
            with the Oracle Approximating Shrinkage coefficient (:func:`oas_coefficient`) before the
            ridge; ``auto``: only while its degrees of freedom are below ``AUTO_OAS_BELOW * dim``
            (:meth:`shrinks`).

    Raises:
        ValueError: unknown score or shrinkage, or non-positive tau.
    """

    def __init__(self, dim: int, score: str = "mahalanobis", tau: float = 1.0, ridge: float = 1e-4,
                 subspace_dims: int = 32, shrinkage: str = "none") -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if shrinkage not in SHRINKAGES:
            raise ValueError(f"shrinkage must be one of {SHRINKAGES}, got {shrinkage!r}")
        self.shrinkage = shrinkage
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.dim, self.score, self.tau, self.ridge, self.q = dim, score, tau, ridge, subspace_dims
        self.means = torch.zeros(0, dim, dtype=torch.float64)  # (C, D) in class-position order
        self.class_task = torch.zeros(0, dtype=torch.int64)  # (C,)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)  # pooled within-class scatter sum
        self.count = 0  # images
        self.task_bases: list[torch.Tensor] = []  # per task (D, q) for the subspace score
        self._cache: Optional[dict[str, torch.Tensor]] = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_bases)

    # ------------------------------------------------------------------ accumulation
    @staticmethod
    def new_accumulator(num_classes: int, dim: int) -> dict[str, torch.Tensor]:
        """Zeroed per-task sums: ``sum`` (C_t, D), ``n`` (C_t,), ``second`` (D, D), all float64."""
        return {
            "sum": torch.zeros(num_classes, dim, dtype=torch.float64),
            "n": torch.zeros(num_classes, dtype=torch.float64),
            "second": torch.zeros(dim, dim, dtype=torch.float64),
        }

    @staticmethod
    def accumulate(acc: dict[str, torch.Tensor], z: torch.Tensor, local_labels: torch.Tensor) -> None:
        """Add features ``z`` (B, D) with task-local labels (B,) to an accumulator."""
        z = z.detach().to(torch.float64).cpu()
        y = local_labels.cpu()
        acc["sum"].index_add_(0, y, z)
        acc["n"].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        acc["second"] += z.T @ z

    def add_task(self, acc: dict[str, torch.Tensor]) -> None:
        """Fold one finished task's accumulator in (its classes get the next positions).

        Raises:
            ValueError: if a class of the task has no image.
        """
        n = acc["n"]
        if (n <= 0).any():
            raise ValueError("every class of a task needs at least one image for its statistics")
        means = acc["sum"] / n[:, None]
        within = acc["second"] - (means * n[:, None]).T @ means
        task = self.num_tasks
        self.means = torch.cat([self.means, means])
        self.class_task = torch.cat([self.class_task, torch.full((len(n),), task, dtype=torch.int64)])
        self.scatter += within
        self.count += int(n.sum())
        second = acc["second"] / float(n.sum())
        vals, vecs = torch.linalg.eigh(0.5 * (second + second.T))
        self.task_bases.append(vecs.flip(1)[:, : self.q].contiguous())
        self._cache = None

    def shift_means(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (C, D) to the stored class means (drift compensation); the scatter is kept."""
        if delta.shape != self.means.shape:
            raise ValueError(f"delta must have the means' shape {tuple(self.means.shape)}, got {tuple(delta.shape)}")
        self.means = self.means + delta.to(torch.float64)
        self._cache = None

    def shrinks(self) -> bool:
        """Whether the Mahalanobis score shrinks the pooled covariance now: always for ``oas``, never for
        ``none``; for ``auto`` while its degrees of freedom (images minus classes so far) are below
        ``AUTO_OAS_BELOW * dim``."""
        if self.shrinkage == "auto":
            return self.count - self.means.shape[0] < AUTO_OAS_BELOW * self.dim
        return self.shrinkage == "oas"

    # ------------------------------------------------------------------ scoring
    def _prepare(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self._cache is not None and self._cache["means"].device == device and self._cache["means"].dtype == dtype:
            return self._cache
        cache: dict[str, torch.Tensor] = {}
        if not (torch.isfinite(self.means).all() and torch.isfinite(self.scatter).all()):
            from duallora.errors import DivergenceError

            raise DivergenceError("the task statistics are not finite: training diverged; lower train.lr")
        if self.score == "mahalanobis":
            dof = max(self.count - self.means.shape[0], 1)
            cov = self.scatter / dof
            cov = 0.5 * (cov + cov.T)
            mean_eig = float(torch.trace(cov)) / self.dim
            if self.shrinks() and mean_eig > 0:
                rho = oas_coefficient(cov, dof)
                cov = (1.0 - rho) * cov + rho * mean_eig * torch.eye(self.dim, dtype=torch.float64)
            # the ridge keeps the matrix invertible; a floor covers a degenerate site (e.g. a class
            # token that is the same for every image) whose covariance is all zero
            ridge = self.ridge * mean_eig if mean_eig > 0 else 0.0
            ridge = max(ridge, 1e-10 * max(mean_eig, 1.0))
            cov = cov + ridge * torch.eye(self.dim, dtype=torch.float64)
            L, info = torch.linalg.cholesky_ex(cov)
            if int(info) != 0:  # round-off made it indefinite: clamp the spectrum instead
                vals, vecs = torch.linalg.eigh(cov)
                cov = (vecs * vals.clamp_min(ridge)) @ vecs.T
                L = torch.linalg.cholesky(0.5 * (cov + cov.T))
            Linv = torch.linalg.solve_triangular(L, torch.eye(self.dim, dtype=torch.float64), upper=False)
            cache["white"] = Linv.T.to(device=device, dtype=dtype).contiguous()  # z @ white = L^{-1} z
            cache["means"] = (self.means @ Linv.T).to(device=device, dtype=dtype)
            # relative distances (class_distances(relative=True)): about the mean of the class means, so
            # the terms that remain stay small in float32; proj = Sigma^{-1} (mu_c - centre), (D, C)
            centre = self.means.mean(dim=0)
            white_means = (self.means - centre) @ Linv.T  # (C, D)
            cache["centre"] = centre.to(device=device, dtype=dtype)
            cache["proj"] = (Linv.T @ white_means.T).to(device=device, dtype=dtype).contiguous()
            cache["means_sq"] = white_means.pow(2).sum(dim=1).to(device=device, dtype=dtype)
        elif self.score == "cosine":
            cache["means"] = F.normalize(self.means, dim=1).to(device=device, dtype=dtype)
        else:
            cache["means"] = self.means.to(device=device, dtype=dtype)
            cache["bases"] = torch.stack(self.task_bases).to(device=device, dtype=dtype)  # (T, D, q)
        cache["class_task"] = self.class_task.to(device)
        self._cache = cache
        return cache

    def task_distances(self, z: torch.Tensor, relative: bool = False) -> torch.Tensor:
        """Per-task distance ``d_j(x)`` for features ``z`` (B, D) -> (B, T); smaller = more likely.

        ``relative``: for the Mahalanobis score, ``d_j(x)`` minus a constant of each row (the same for
        every task; see :meth:`class_distances`), which is all a softmax over tasks needs. Computed in
        (at least) float32 even under autocast."""
        if self.num_tasks == 0:
            raise RuntimeError("no task statistics yet: learn a task first")
        if z.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(z.device.type):
            with torch.autocast(device_type=z.device.type, enabled=False):
                return self.task_distances(z.float(), relative)
        c = self._prepare(z.device, z.dtype)
        T = self.num_tasks
        if self.score == "subspace":
            zn = F.normalize(z, dim=1)
            energy = torch.einsum("bd,tdq->btq", zn, c["bases"]).pow(2).sum(-1)  # (B, T)
            return 1.0 - energy
        d = self.class_distances(z, relative)  # (B, C)
        out = torch.full((z.shape[0], T), float("inf"), device=z.device, dtype=z.dtype)
        idx = c["class_task"].expand_as(d)
        return out.scatter_reduce(1, idx, d, reduce="amin", include_self=True)

    def class_distances(self, z: torch.Tensor, relative: bool = False) -> torch.Tensor:
        """Per-class distance ``d_c(x)`` for features ``z`` (B, D) -> (B, C), columns in class-position
        order; smaller = closer. ``mahalanobis`` and ``cosine`` only (``subspace`` scores tasks, not classes).

        ``d_c(x) = |L^{-1} (z - mu_c)|^2 / D`` (``Sigma = L L^T``, the pooled covariance). With
        ``relative=True`` (Mahalanobis only; cosine ignores it) the result is ``d_c(x)`` minus
        ``|L^{-1} (z - m)|^2 / D`` (``m`` the mean of the class means), a constant of each row, i.e.
        ``(|L^{-1} (mu_c - m)|^2 - 2 (z - m)^T Sigma^{-1} (mu_c - m)) / D``: any softmax over classes or tasks
        of ``-d / tau`` is unchanged (up to float rounding), and it costs O(D C) per image instead of
        O(D^2 + D C) (inference at 100 classes and D = 1,344: docs/performance.md).

        Raises:
            RuntimeError: no statistics yet. ValueError: ``score="subspace"``.
        """
        if self.num_tasks == 0:
            raise RuntimeError("no task statistics yet: learn a task first")
        if self.score == "subspace":
            raise ValueError("score='subspace' has no class-level distance")
        c = self._prepare(z.device, z.dtype)
        if self.score == "mahalanobis":
            if relative:
                return (c["means_sq"] - 2.0 * ((z - c["centre"]) @ c["proj"])) / self.dim
            w = z @ c["white"]
            return (w[:, None, :] - c["means"][None]).pow(2).sum(-1) / self.dim
        return 1.0 - F.normalize(z, dim=1) @ c["means"].T

    def task_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """``p(j | x)`` (B, T) for features ``z`` (B, D); rows sum to 1."""
        return torch.softmax(-self.task_distances(z, relative=True) / self.tau, dim=1)

    # ------------------------------------------------------------------ state
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint (float64 statistics, exact)."""
        out = {
            f"{prefix}means": self.means.clone(),
            f"{prefix}class_task": self.class_task.clone(),
            f"{prefix}scatter": self.scatter.clone(),
            f"{prefix}count": torch.tensor([self.count], dtype=torch.int64),
        }
        for j, b in enumerate(self.task_bases):
            out[f"{prefix}task_basis.{j}"] = b.clone()
        return out

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state` output."""
        self.means = tensors[f"{prefix}means"].to(torch.float64).clone()
        self.class_task = tensors[f"{prefix}class_task"].to(torch.int64).clone()
        self.scatter = tensors[f"{prefix}scatter"].to(torch.float64).clone()
        self.count = int(tensors[f"{prefix}count"][0])
        self.task_bases = []
        j = 0
        while f"{prefix}task_basis.{j}" in tensors:
            self.task_bases.append(tensors[f"{prefix}task_basis.{j}"].to(torch.float64).clone())
            j += 1
        self._cache = None


#: Bandwidth of :func:`semantic_drift`'s weights, in per-dimension squared Mahalanobis distance.
DRIFT_BANDWIDTH = 0.1


@torch.no_grad()
def semantic_drift(before: torch.Tensor, after: torch.Tensor, signatures: TaskSignatures,
                   bandwidth: float = DRIFT_BANDWIDTH) -> torch.Tensor:
    """Estimated drift (C, D) of every stored class mean, from the drift of the new task's features.

    Semantic drift compensation (Yu et al., CVPR 2020, eq. 6-7), in the whitened space of the stored pooled
    covariance: each image i of the new task moved by ``after_i - before_i`` while the task was learned; class
    c's mean moves by their average weighted by ``w_ic = exp(-(d_ic - min_i d_ic) / bandwidth)``, ``d_ic`` the
    per-dimension squared Mahalanobis distance of ``before_i`` to the mean (so the images nearest to the class
    dominate). No image of an old class is needed. Under torchrun each process passes its shard of the images;
    the minimum and both weighted sums are reduced over processes, so every process gets the same drift.

    Args:
        before, after: (N, D) the same images' features before and after the task, in the same order.
        signatures: the stored statistics (C classes of D features).

    Returns:
        (C, D) float64, to add to ``signatures.means`` (:meth:`TaskSignatures.shift_means`).

    Raises:
        ValueError: ``before`` and ``after`` differ in shape.
    """
    if before.shape != after.shape:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} must match")
    delta = (after - before).double()
    d = signatures.class_distances(before.double())  # (N, C)
    nearest = distributed.all_reduce_min_(d.min(dim=0, keepdim=True).values)  # (1, C)
    w = torch.exp(-(d - nearest) / bandwidth)  # (N, C), at most 1
    moved, weight = distributed.all_reduce_sum_(w.T @ delta), distributed.all_reduce_sum_(w.sum(dim=0))
    return moved / weight[:, None]
