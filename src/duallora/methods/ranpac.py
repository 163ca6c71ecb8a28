"""``ranpac``: random projection, a nonlinearity and a ridge-regression head on the frozen backbone
(McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning",
NeurIPS 2023, arXiv 2307.02251)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from duallora import distributed
from duallora.methods.base import TaskContext
from duallora.methods.options import TAU_ID, Option, positive_int
from duallora.methods.registry import register_method
from duallora.methods.statistics import StatisticsClassifier, require_every_class
from duallora.model import AdaptedViT

if TYPE_CHECKING:
    from duallora.config import MethodConfig

#: The ridge grid of RanPAC's official code (``optimise_ridge_parameter``: ``10.0 ** np.arange(-8, 9)``).
RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))


def ridge_solve(G: torch.Tensor, Q: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W = (G + ridge I)^-1 Q``: the ridge-regression head in closed form (RanPAC, Eq. 4).

    Args:
        G: (M, M) Gram matrix ``sum_n h_n h_n^T`` of the projected features.
        Q: (M, C) ``sum_n h_n y_n^T`` with one-hot targets y.
        ridge: lambda > 0.

    Returns:
        (M, C) head weights (logits = ``h @ W``), in G's dtype.
    """
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, Q)


def choose_ridge(H: torch.Tensor, Y: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """The ridge of ``grid`` with the least mean squared error on the last 20% of the task's features
    when fitted on the first 80% (RanPAC's official ``optimise_ridge_parameter``, on the current
    task's features only; the loader order is seeded, so the split is a seeded random split).

    Solved through the SVD of the fitting part, so the whole grid costs one decomposition.

    Args:
        H: (N, M) projected features of the task's training images; Y: (N, C) one-hot targets.

    Returns:
        the chosen lambda. With fewer than 5 images, the middle of the grid (1.0).
    """
    n = H.shape[0]
    cut = int(n * 0.8)
    if cut < 1 or cut >= n:
        return 1.0
    A, B = H[:cut].double(), H[cut:].double()
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)  # A = U S Vh
    UtY = U.T @ Y[:cut].double()
    BV = B @ Vh.T
    target = Y[cut:].double()
    best, best_loss = grid[0], float("inf")
    for ridge in grid:
        W_coef = (S / (S**2 + ridge))[:, None] * UtY  # W = V diag(s/(s^2+l)) U^T Y
        loss = float(F.mse_loss(BV @ W_coef, target))
        if loss < best_loss:
            best, best_loss = ridge, loss
    return best


@register_method
class RanPAC(StatisticsClassifier):
    """RanPAC without first-session adaptation: frozen backbone, random projection, ridge head.

    Per image the final feature ``f`` (D) is projected to ``h = ReLU(f W_rand)`` (M) with a fixed
    Gaussian ``W_rand`` (D, M) drawn from the run seed. After each task the Gram matrix
    ``G += H^T H`` (M, M) and ``Q += H^T Y`` (M, C) are updated with the task's training images, the
    ridge lambda is chosen on an 80/20 split of the task's own features from the grid 1e-8 ... 1e8
    (:func:`choose_ridge`), and the head is ``W = (G + lambda I)^-1 Q`` (:func:`ridge_solve`); logits
    are ``h W``. Nothing is trained; no images are kept; the result does not depend on task order
    within the sums (exact closed form, as the paper's Eq. 4). Probabilities are
    ``softmax(logits / tau_id)``; the task posterior sums them per task.

    Reproduced (official code, RanPAC.py: ``setup_RP``, ``replace_fc``, ``optimise_ridge_parameter``):
    ``W_rand ~ N(0, 1)``, ReLU, the ridge grid and its 80/20 choice per task, the solve of
    ``G + lambda I``. Changed: ``M`` (``method.ranpac_dim``) is 2000, not the published 10000: the
    published ratio M/D is 13 for ViT-B's D = 768, 2000 gives 10.4 for this project's D = 192, and
    G (M x M, float64) is stored in every task checkpoint (32 MB at 2000, 800 MB at 10000). Not
    reproduced: Phase 1 (the paper's parameter-efficient fine-tuning on the first task; this variant
    is the paper's training-free ablation), its ViT-B/16 backbone. Computed in float64 (the official
    code uses float32).

    Raises:
        TrainingError: a class without training images.
    """

    name = "ranpac"
    options = {
        "tau_id": TAU_ID,
        "ranpac_dim": Option(2000, "ranpac: M, the random projection's dimension (published: 10000 for "
                                   "D=768 features; here 2000 for D=192, see the class)", check=positive_int),
    }

    def __init__(self, model: AdaptedViT, cfg: MethodConfig, seed: int = 0) -> None:
        super().__init__(model, cfg, seed)
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        m = int(cfg.ranpac_dim)
        self.W_rand = torch.randn(model.embed_dim, m, generator=gen)
        self.G = torch.zeros(m, m, dtype=torch.float64)
        self.Q = torch.zeros(m, 0, dtype=torch.float64)
        self.W = torch.zeros(m, 0, dtype=torch.float64)
        self.ridges: list[float] = []

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """``ReLU(feats @ W_rand)``: (B, D) -> (B, M), float32."""
        return torch.relu(feats.float() @ self.W_rand.to(feats.device))

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict:
        """Add the task's projected features to G and Q, choose lambda, solve for the head."""
        H_parts, y_parts = [], []
        for x, y in ctx.progress(ctx.stats_loader, f"task {ctx.task + 1} statistics"):
            H_parts.append(self.project(self.model.features(x.to(ctx.device))).cpu())
            y_parts.append(y.cpu())
        H = torch.cat(H_parts).double()
        labels = torch.cat(y_parts)
        counts = torch.bincount(labels, minlength=ctx.num_classes)
        require_every_class(counts, ctx.task)
        offset = self.Q.shape[1]
        Y = torch.zeros(H.shape[0], offset + ctx.num_classes, dtype=torch.float64)
        Y[torch.arange(H.shape[0]), offset + labels] = 1.0
        G_task, Q_task = H.T @ H, H.T @ Y
        distributed.all_reduce_sum_(G_task)
        distributed.all_reduce_sum_(Q_task)
        self.G += G_task
        self.Q = torch.cat([self.Q, torch.zeros(self.Q.shape[0], ctx.num_classes, dtype=torch.float64)], 1) + Q_task
        ridge = choose_ridge(H, Y)  # on this process's share of the task (all of it without torchrun)
        self.ridges.append(ridge)
        self.W = ridge_solve(self.G, self.Q, ridge).contiguous()  # row-major, as after a reload
        super().end_task(ctx)
        return {"ridge": ridge}

    def class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``ReLU(feats W_rand) W / tau_id``: (B, D) -> (B, C)."""
        W = self.W.to(device=feats.device, dtype=torch.float32)
        return self.project(feats) @ W / self.cfg.tau_id

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        out.update({"ranpac.W_rand": self.W_rand.clone(), "ranpac.G": self.G.clone(), "ranpac.Q": self.Q.clone(),
                    "ranpac.W": self.W.clone(), "ranpac.ridges": torch.tensor(self.ridges, dtype=torch.float64)})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.W_rand = tensors["ranpac.W_rand"].float().clone()
        self.G = tensors["ranpac.G"].double().clone()
        self.Q = tensors["ranpac.Q"].double().clone()
        self.W = tensors["ranpac.W"].double().clone()
        self.ridges = [float(v) for v in tensors["ranpac.ridges"].tolist()]
