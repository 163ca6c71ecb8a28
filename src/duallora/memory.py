"""The subspace memory of an adapted layer (method.md, "The subspace memory").

An orthonormal basis ``M`` (d, m) of the input directions that earlier tasks used, grown after each
task with the Gradient Projection Memory energy criterion (Saha et al., ICLR 2021, Sec. 4):
with a task's input Gram matrix ``G = sum h h^T``, total energy ``E = tr(G)``, already-covered
energy ``E_M = tr(M^T G M)`` and eigenpairs ``(lambda_i, u_i)`` of ``(I - M M^T) G (I - M M^T)``,
add the fewest top ``u_i`` such that ``E_M + sum lambda_i >= eps * E``.

The memory also supplies the DualLoRA adapters' fixed factors:

* :meth:`SubspaceMemory.orthogonal_directions`: ``A_o``, the top eigenvectors of the Gram matrix
  projected away from ``M`` (method.md, "Learning task t", step 2);
* :meth:`SubspaceMemory.inside_directions`: ``P_t``, the top eigenvectors of the Gram matrix
  projected onto ``M`` (step 3).

All eigendecompositions run in float64 on the summed ``d x d`` matrix, so statistics gathered over
batches or processes give the same result as one pass.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Eigenvalues below this share of tr(G) (the task's own energy) are numerically zero.
REL_EIG_TOL = 1e-12
#: Slack on the energy criterion, relative to the total energy (so eps = 1 terminates).
ENERGY_SLACK = 1e-12


def _eigh_desc(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric matrix in descending order (float64)."""
    S = 0.5 * (S + S.T)
    vals, vecs = torch.linalg.eigh(S.to(torch.float64))
    return vals.flip(0), vecs.flip(1)


class GramAccumulator:
    """Running sum ``G = sum h h^T`` over tokens of inputs ``h`` (..., d), in float64.

    Args:
        dim: d, the input width.
        tokens: ``"all"`` (every token) or ``"cls"`` (token 0 only, inputs of shape (B, N, d)).
    """

    def __init__(self, dim: int, tokens: str = "all") -> None:
        if tokens not in ("all", "cls"):
            raise ValueError(f"tokens must be 'all' or 'cls', got {tokens!r}")
        self.dim = dim
        self.tokens = tokens
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, h: torch.Tensor) -> None:
        """Add the tokens of ``h`` (B, N, d) (or (B, d)) to the sum."""
        h = h.detach()
        if self.tokens == "cls" and h.ndim == 3:
            h = h[:, 0]
        flat = h.reshape(-1, self.dim).to(torch.float64)
        self.gram += (flat.T @ flat).cpu()
        self.count += flat.shape[0]


class SubspaceMemory:
    """Orthonormal basis of the input directions earlier tasks used, for one adapted layer.

    Args:
        dim: d, the layer's input width.

    Attributes:
        basis: ``M``, float64 tensor (d, m) with orthonormal columns; m = 0 at the start.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.basis = torch.zeros(dim, 0, dtype=torch.float64)

    @property
    def size(self) -> int:
        """m, the number of directions held."""
        return int(self.basis.shape[1])

    def _project_out(self, G: torch.Tensor) -> torch.Tensor:
        G = G.to(torch.float64)
        if self.size == 0:
            return G
        Q = torch.eye(self.dim, dtype=torch.float64) - self.basis @ self.basis.T
        return Q @ G @ Q

    def _project_in(self, G: torch.Tensor) -> torch.Tensor:
        M = self.basis
        return M @ (M.T @ G.to(torch.float64) @ M) @ M.T

    def orthogonal_directions(self, G: torch.Tensor, rank: int) -> torch.Tensor:
        """``A_o``: top-``rank`` eigenvectors of ``(I - M M^T) G (I - M M^T)`` as rows.

        Directions with a numerically zero eigenvalue are dropped, so the result may have fewer rows
        (zero when the memory already spans all of the task's input energy).

        Args:
            G: (d, d) Gram matrix of the new task's inputs.
            rank: r_o.

        Returns:
            float64 (r', d), r' <= rank, rows orthonormal and orthogonal to ``M``.
        """
        tol = REL_EIG_TOL * float(torch.trace(G.to(torch.float64)))
        vals, vecs = _eigh_desc(self._project_out(G))
        keep = int((vals[:rank] > tol).sum()) if tol > 0 else 0
        A = vecs[:, :keep].T.contiguous()
        if self.size and keep:
            # remove round-off components along M (keeps A orthogonal to M to float64 precision)
            A = A - (A @ self.basis) @ self.basis.T
            A = torch.linalg.qr(A.T).Q.T.contiguous()
        return A

    def inside_directions(self, G: torch.Tensor, rank: int) -> torch.Tensor:
        """``P_t``: top-``rank`` eigenvectors of ``M M^T G M M^T`` as columns (rank capped by m).

        Args:
            G: (d, d) Gram matrix of the new task's inputs.
            rank: r_r.

        Returns:
            float64 (d, r'), r' = min(rank, m, number of non-zero eigenvalues); columns in span M.
        """
        if self.size == 0:
            return torch.zeros(self.dim, 0, dtype=torch.float64)
        tol = REL_EIG_TOL * float(torch.trace(G.to(torch.float64)))
        vals, vecs = _eigh_desc(self._project_in(G))
        cap = min(rank, self.size)
        keep = int((vals[:cap] > tol).sum()) if tol > 0 else 0
        return vecs[:, :keep].contiguous()

    def grow(self, G: torch.Tensor, threshold: float) -> int:
        """Add the fewest new directions so that the memory covers ``threshold`` of G's energy.

        Args:
            G: (d, d) Gram matrix of the finished task's inputs (with the updated model).
            threshold: eps in (0, 1].

        Returns:
            the number of directions added.

        Raises:
            ValueError: if ``threshold`` is outside (0, 1].
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"energy threshold must lie in (0, 1], got {threshold}")
        G = G.to(torch.float64)
        total = float(torch.trace(G))
        if total <= 0:
            return 0
        covered = float(torch.trace(self.basis.T @ G @ self.basis)) if self.size else 0.0
        target = threshold * total - ENERGY_SLACK * total
        if covered >= target:
            return 0
        vals, vecs = _eigh_desc(self._project_out(G))
        vals = vals.clamp_min(0.0)
        usable = int((vals > REL_EIG_TOL * total).sum())
        usable = min(usable, self.dim - self.size)
        cum = covered + torch.cumsum(vals[:usable], 0)
        reached = torch.nonzero(cum >= target).flatten()
        n_add = int(reached[0]) + 1 if reached.numel() else usable
        if n_add == 0:
            return 0
        new = vecs[:, :n_add]
        if self.size:
            new = new - self.basis @ (self.basis.T @ new)
        basis = torch.cat([self.basis, new], dim=1)
        # re-orthonormalise (Gram-Schmidt via QR) to keep M^T M = I to float64 precision
        q, r = torch.linalg.qr(basis)
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        self.basis = (q * signs).contiguous()
        return n_add

    def covered_energy(self, G: torch.Tensor) -> float:
        """Share of G's energy inside the memory, ``tr(M^T G M) / tr(G)`` in [0, 1]."""
        G = G.to(torch.float64)
        total = float(torch.trace(G))
        if total <= 0 or self.size == 0:
            return 0.0
        return float(torch.trace(self.basis.T @ G @ self.basis)) / total

    def state(self) -> torch.Tensor:
        """The basis (d, m), float64, for checkpoints."""
        return self.basis.clone()

    def load(self, basis: torch.Tensor) -> None:
        """Restore the basis saved by :meth:`state`."""
        if basis.ndim != 2 or basis.shape[0] != self.dim:
            raise ValueError(f"basis must be ({self.dim}, m), got {tuple(basis.shape)}")
        self.basis = basis.to(torch.float64).clone()


def energy_threshold(task: int, num_tasks: Optional[int], start: float, end: float) -> float:
    """eps_t of the schedule that rises linearly from ``start`` (first task) to ``end`` (last task).

    Args:
        task: 0-based task index.
        num_tasks: T; None or 1 gives ``start`` for every task.
    """
    if not num_tasks or num_tasks <= 1:
        return start
    return start + (end - start) * min(task, num_tasks - 1) / (num_tasks - 1)
