"""Baseline translators of a TinyLM update into an LLM update.

The baselines a learned translator must beat (docs/method.md): the mean shadow update, a ridge map and nearest-neighbour retrieval. All
share one interface: ``fit(X, Y, subset_ids=None) -> self`` on shadow-corpus pairs
``X (N, L_tiny, d_tiny)`` / ``Y (N, L_llm, d_llm)``, ``predict(X) -> (B, L_llm, d_llm)``,
and ``to_state()`` / ``from_state()`` (tensors + a JSON-able dict) for
:func:`save_baseline` / :func:`load_baseline` (safetensors, no pickle).

Their predictions are compared with the true updates by :mod:`gt_ray.vector_metrics`.

Read top-down: shared checks, the three baselines, save/load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open

from gt_ray import storage
from gt_ray.wire import safetensors_bytes

logger = logging.getLogger(__name__)

BASELINE_FORMAT = "gt-ray-baseline-v1"
"""``format`` entry of a baseline safetensors file's metadata."""
DEFAULT_LAMBDAS = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
"""Ridge grid, in units of standardized features (the kernel diagonal is about D_x)."""
_REL_STD_FLOOR = 1e-6
"""Coordinates whose std is below this fraction of the largest std are left unscaled."""


# ------------------------------------------------------------------------ shared checks


def _check_pairs(X: torch.Tensor, Y: torch.Tensor, subset_ids: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
    """Validate training pairs; returns subset ids as a (N,) long tensor on X's device, or None."""
    if X.dim() != 3 or Y.dim() != 3:
        raise ValueError(f"X and Y must be 3-d (N, L, d), got shapes {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"X and Y need the same non-zero number of rows, got {X.shape[0]} and {Y.shape[0]}")
    if not (X.is_floating_point() and Y.is_floating_point()):
        raise ValueError(f"X and Y must be floating point, got {X.dtype} and {Y.dtype}")
    if not (bool(torch.isfinite(X).all()) and bool(torch.isfinite(Y).all())):
        raise ValueError("X or Y has non-finite values (NaN or inf)")
    if subset_ids is None:
        return None
    ids = torch.as_tensor(subset_ids, dtype=torch.long, device=X.device).reshape(-1)
    if ids.numel() != X.shape[0]:
        raise ValueError(f"subset_ids has {ids.numel()} entries, X has {X.shape[0]} rows")
    return ids


def _standardizer(xf: torch.Tensor, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and std of ``xf (N, D)``; std 1 for (near-)constant coordinates or if not ``scale``."""
    mean = xf.mean(0)
    if not scale:
        return mean, torch.ones_like(mean)
    std = xf.std(0, unbiased=False)
    # A coordinate that barely moves (e.g. float rounding of a fixed value) would become unit-variance noise.
    keep = std > _REL_STD_FLOOR * std.max()
    return mean, torch.where(keep, std, torch.ones_like(std))


def _subset_means(
    xf: torch.Tensor, yf: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-subset means of rows: (unique ids (M,), mean X (M, D_x), mean Y (M, D_y)), ids sorted."""
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    counts = torch.bincount(inverse, minlength=unique.numel()).to(xf.dtype)[:, None]
    mx = torch.zeros(unique.numel(), xf.shape[1], dtype=xf.dtype, device=xf.device).index_add_(0, inverse, xf)
    my = torch.zeros(unique.numel(), yf.shape[1], dtype=torch.float64, device=yf.device).index_add_(0, inverse, yf.double())
    return unique, mx / counts, (my / counts.double()).to(yf.dtype)


class Baseline:
    """Shape bookkeeping and the state protocol shared by the baselines (not used directly)."""

    kind: ClassVar[str] = ""

    def __init__(self) -> None:
        self.x_shape: tuple[int, int] | None = None  # (L_tiny, d_tiny)
        self.y_shape: tuple[int, int] | None = None  # (L_llm, d_llm)

    def _record_shapes(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        self.x_shape, self.y_shape = tuple(X.shape[1:]), tuple(Y.shape[1:])

    def _check_x(self, X: torch.Tensor) -> None:
        if self.x_shape is None:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit first")
        if X.dim() != 3 or tuple(X.shape[1:]) != self.x_shape:
            raise ValueError(f"X must have shape (B, {self.x_shape[0]}, {self.x_shape[1]}), got {tuple(X.shape)}")

    def _base_config(self) -> dict[str, Any]:
        if self.x_shape is None:
            raise ValueError(f"{type(self).__name__} is not fitted: nothing to save")
        return {"kind": self.kind, "x_shape": list(self.x_shape), "y_shape": list(self.y_shape)}

    def _restore_shapes(self, config: Mapping[str, Any]) -> None:
        if config.get("kind") != self.kind:
            raise ValueError(f"state is for baseline {config.get('kind')!r}, not {self.kind!r}")
        self.x_shape, self.y_shape = tuple(config["x_shape"]), tuple(config["y_shape"])

    @staticmethod
    def _require(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"baseline state lacks tensors {missing}")

    def fit(self, X: torch.Tensor, Y: torch.Tensor, subset_ids: Sequence[int] | torch.Tensor | None = None) -> Baseline:
        raise NotImplementedError

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError


# -------------------------------------------------------------------------- baselines


class MeanUpdate(Baseline):
    """Predicts the mean training LLM update whatever the input (the data-free baseline)."""

    kind = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.y_mean: torch.Tensor | None = None  # (L_llm, d_llm)

    def fit(self, X: torch.Tensor, Y: torch.Tensor, subset_ids: Sequence[int] | torch.Tensor | None = None) -> MeanUpdate:
        """Store the mean of ``Y``.

        Args:
            X: (N, L_tiny, d_tiny) TinyLM vectors (only their shape is used).
            Y: (N, L_llm, d_llm) LLM vectors.
            subset_ids: ignored (every row counts once).

        Returns:
            self.
        """
        _check_pairs(X, Y, subset_ids)
        self._record_shapes(X, Y)
        self.y_mean = Y.double().mean(0).to(Y.dtype)
        return self

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(B, L_tiny, d_tiny) -> (B, L_llm, d_llm), every row the training mean."""
        self._check_x(X)
        return self.y_mean.to(X.device).expand(X.shape[0], *self.y_shape).clone()

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"y_mean": self.y_mean}, self._base_config()

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> MeanUpdate:
        out = cls()
        out._restore_shapes(config)
        cls._require(tensors, ["y_mean"])
        out.y_mean = tensors["y_mean"]
        return out


class RidgeMap(Baseline):
    """Ridge regression from flattened X to flattened Y, with intercept.

    X is standardized per coordinate (training mean and std), Y centered; the intercept is
    the training mean of Y and is not penalized. With ``solver="dual"`` (the default when
    N < D_x, as for shadow corpora) the model is stored as dual coefficients
    ``alpha = (Z Z^T + lambda I)^-1 Yc`` with the standardized training inputs ``Z``, and
    predicts ``z Z^T alpha``: this equals the primal ``W = Z^T alpha`` without ever forming
    the (D_x, D_y) matrix. The X-side algebra runs in float64, products with Y in Y's dtype.

    ``lam`` fixed: used as is. Otherwise, with ``subset_ids`` of at least 2 subsets,
    lambda is chosen from ``lambdas`` by ``n_folds``-fold leave-subsets-out validation
    (all rows of a subset fall in one fold; standardization refit per fold), minimizing
    the held-out squared error; without subset ids ``default_lam`` is used.

    Attributes set by ``fit``: ``lam_`` (the lambda used), ``cv_errors`` (mean squared
    error per value for each of ``lambdas``, or None).
    """

    kind = "ridge"

    def __init__(
        self,
        lam: float | None = None,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        n_folds: int = 5,
        standardize: bool = True,
        solver: str = "auto",
        default_lam: float = 1e2,
    ) -> None:
        super().__init__()
        if lam is not None and not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if not lambdas or not all(float(v) > 0 for v in lambdas):
            raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {list(lambdas)}")
        if n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {n_folds}")
        if solver not in ("auto", "dual", "primal"):
            raise ValueError(f"solver must be 'auto', 'dual' or 'primal', got {solver!r}")
        if not default_lam > 0:
            raise ValueError(f"default_lam must be > 0, got {default_lam}")
        self.lam, self.lambdas, self.n_folds = lam, tuple(float(v) for v in lambdas), n_folds
        self.standardize, self.solver, self.default_lam = standardize, solver, float(default_lam)
        self.lam_: float | None = None
        self.cv_errors: list[float] | None = None
        self.dual_: bool | None = None
        self.x_mean = self.x_std = self.y_mean = None  # (D_x,), (D_x,), (D_y,)
        self.train_z: torch.Tensor | None = None  # (N, D_x) standardized training X (dual)
        self.coef: torch.Tensor | None = None  # (N, D_y) dual coefficients or (D_x, D_y) weights

    # Both forms come from one eigendecomposition of the smaller Gram matrix, so a grid of
    # lambdas costs one decomposition: dual Z Z^T = U S U^T, primal Z^T Z = V S V^T.
    @staticmethod
    def _spectrum(z: torch.Tensor, dual: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s, u = torch.linalg.eigh(z @ z.T if dual else z.T @ z)
        return s.clamp(min=0), u

    def _use_dual(self, n: int, d_x: int) -> bool:
        return self.solver == "dual" or (self.solver == "auto" and n < d_x)

    def _select_lambda(self, xf: torch.Tensor, yf: torch.Tensor, ids: torch.Tensor) -> float:
        unique = torch.unique(ids, sorted=True)
        n_folds = min(self.n_folds, unique.numel())
        fold_of = {int(s): i % n_folds for i, s in enumerate(unique.tolist())}
        fold = torch.tensor([fold_of[int(s)] for s in ids.tolist()], device=xf.device)
        sq = torch.zeros(len(self.lambdas), dtype=torch.float64)
        for f in range(n_folds):
            va, tr = fold == f, fold != f
            mean, std = _standardizer(xf[tr], self.standardize)
            z_tr, z_va = (xf[tr] - mean) / std, (xf[va] - mean) / std
            y_mean = yf[tr].double().mean(0).to(yf.dtype)
            yc = yf[tr] - y_mean
            dual = self._use_dual(z_tr.shape[0], z_tr.shape[1])
            s, u = self._spectrum(z_tr, dual)
            # predictions for every lambda: (P * 1 / (s + lambda)) @ Q
            p = (z_va @ z_tr.T @ u) if dual else (z_va @ u)  # (n_va, n_tr) or (n_va, D_x)
            q = (u.T.to(yc.dtype) @ yc) if dual else (u.T @ z_tr.T).to(yc.dtype) @ yc
            for i, lam in enumerate(self.lambdas):
                pred = (p / (s + lam)).to(yc.dtype) @ q + y_mean
                sq[i] += (pred - yf[va]).double().pow(2).sum().cpu()
        self.cv_errors = (sq / yf.numel()).tolist()
        best = int(torch.argmin(sq))
        logger.info("ridge: lambda=%g by %d-fold leave-subsets-out validation over %d subsets (mse %s)",
                    self.lambdas[best], n_folds, unique.numel(),
                    ", ".join(f"{lam:g}:{e:.3g}" for lam, e in zip(self.lambdas, self.cv_errors)))
        return self.lambdas[best]

    def fit(self, X: torch.Tensor, Y: torch.Tensor, subset_ids: Sequence[int] | torch.Tensor | None = None) -> RidgeMap:
        """Fit the map (choosing lambda first, see the class docstring).

        Args:
            X: (N, L_tiny, d_tiny) TinyLM vectors.
            Y: (N, L_llm, d_llm) LLM vectors.
            subset_ids: (N,) shadow subset of each row, for leave-subsets-out validation.

        Returns:
            self.
        """
        ids = _check_pairs(X, Y, subset_ids)
        self._record_shapes(X, Y)
        n = X.shape[0]
        xf = X.reshape(n, -1).double()  # (N, D_x)
        yf = Y.reshape(n, -1).float() if Y.dtype in (torch.float16, torch.bfloat16) else Y.reshape(n, -1)  # (N, D_y)
        self.cv_errors = None
        if self.lam is not None:
            self.lam_ = float(self.lam)
        elif ids is not None and torch.unique(ids).numel() >= 2:
            self.lam_ = self._select_lambda(xf, yf, ids)
        else:
            self.lam_ = self.default_lam
            logger.info("ridge: no subset ids to validate on, lambda=%g (default)", self.lam_)
        self.x_mean, self.x_std = _standardizer(xf, self.standardize)
        z = (xf - self.x_mean) / self.x_std
        self.y_mean = yf.double().mean(0).to(yf.dtype)
        yc = yf - self.y_mean
        self.dual_ = self._use_dual(n, z.shape[1])
        s, u = self._spectrum(z, self.dual_)
        if self.dual_:  # alpha = U diag(1/(s+lam)) U^T Yc
            self.coef = ((u / (s + self.lam_)) @ u.T).to(yc.dtype) @ yc  # (N, D_y)
            self.train_z = z.to(yc.dtype)
        else:  # W = V diag(1/(s+lam)) V^T Z^T Yc
            self.coef = ((u / (s + self.lam_)) @ u.T @ z.T).to(yc.dtype) @ yc  # (D_x, D_y)
            self.train_z = None
        self.x_mean, self.x_std = self.x_mean.to(yc.dtype), self.x_std.to(yc.dtype)
        return self

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(B, L_tiny, d_tiny) -> (B, L_llm, d_llm)."""
        self._check_x(X)
        if self.coef is None:
            raise ValueError("RidgeMap is not fitted: call fit first")
        z = (X.reshape(X.shape[0], -1).double() - self.x_mean.double()) / self.x_std.double()  # (B, D_x)
        if self.dual_:
            out = (z @ self.train_z.double().T).to(self.coef.dtype) @ self.coef  # (B, N) @ (N, D_y)
        else:
            out = z.to(self.coef.dtype) @ self.coef
        return (out + self.y_mean).reshape(X.shape[0], *self.y_shape)

    def weights(self) -> torch.Tensor:
        """The primal weight matrix ``(D_x, D_y)`` on standardized inputs (formed from the dual if needed)."""
        if self.coef is None:
            raise ValueError("RidgeMap is not fitted: call fit first")
        return self.train_z.T @ self.coef if self.dual_ else self.coef

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = {**self._base_config(), "lam": self.lam_, "dual": self.dual_, "standardize": self.standardize,
                  "lambdas": list(self.lambdas), "cv_errors": self.cv_errors}
        tensors = {"x_mean": self.x_mean, "x_std": self.x_std, "y_mean": self.y_mean, "coef": self.coef}
        if self.dual_:
            tensors["train_z"] = self.train_z
        return tensors, config

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> RidgeMap:
        out = cls(lam=config["lam"], lambdas=config["lambdas"], standardize=config["standardize"],
                  solver="dual" if config["dual"] else "primal")
        out._restore_shapes(config)
        cls._require(tensors, ["x_mean", "x_std", "y_mean", "coef"] + (["train_z"] if config["dual"] else []))
        out.lam_, out.dual_, out.cv_errors = float(config["lam"]), bool(config["dual"]), config.get("cv_errors")
        out.x_mean, out.x_std, out.y_mean, out.coef = (tensors[k] for k in ("x_mean", "x_std", "y_mean", "coef"))
        out.train_z = tensors.get("train_z")
        return out


class NearestNeighbour(Baseline):
    """Retrieval: the LLM update of the training entries whose TinyLM update is closest.

    Distance is cosine similarity of flattened X after per-coordinate standardization
    (mean and std of the retrieval bank): the direction of an update carries the task,
    its size varies with step count and learning rate. With ``by_subset`` (default) the
    bank holds one entry per shadow subset, the mean X and mean Y over its rows (its
    snapshot steps); pass only final-step rows to retrieve final updates instead. Without
    ``by_subset``, or without subset ids, every row is an entry. With ``k > 1`` the
    prediction is the plain mean of the k neighbours' Y.

    Attributes set by ``fit``: ``bank_ids`` (M,) the subset id (or row index) of each entry.
    """

    kind = "nearest"

    def __init__(self, k: int = 1, by_subset: bool = True, standardize: bool = True) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.by_subset, self.standardize = k, by_subset, standardize
        self.x_mean = self.x_std = None  # (D_x,)
        self.keys: torch.Tensor | None = None  # (M, D_x) standardized, unit-norm bank inputs
        self.values: torch.Tensor | None = None  # (M, L_llm, d_llm)
        self.bank_ids: torch.Tensor | None = None  # (M,)

    def fit(
        self, X: torch.Tensor, Y: torch.Tensor, subset_ids: Sequence[int] | torch.Tensor | None = None
    ) -> NearestNeighbour:
        """Build the retrieval bank.

        Args:
            X: (N, L_tiny, d_tiny) TinyLM vectors.
            Y: (N, L_llm, d_llm) LLM vectors.
            subset_ids: (N,) shadow subset of each row; needed for ``by_subset``.

        Returns:
            self.

        Raises:
            ValueError: if the bank has fewer than ``k`` entries.
        """
        ids = _check_pairs(X, Y, subset_ids)
        self._record_shapes(X, Y)
        n = X.shape[0]
        xf, yf = X.reshape(n, -1).double(), Y.reshape(n, -1)
        if self.by_subset and ids is not None:
            self.bank_ids, xf, yf = _subset_means(xf, yf, ids)
        else:
            if self.by_subset:
                logger.info("nearest neighbour: no subset ids, retrieving single rows")
            self.bank_ids = ids if ids is not None else torch.arange(n, device=X.device)
        if xf.shape[0] < self.k:
            raise ValueError(f"k={self.k} neighbours but the bank has only {xf.shape[0]} entries")
        mean, std = _standardizer(xf, self.standardize)
        self.keys = F.normalize((xf - mean) / std, dim=1).to(Y.dtype)
        self.x_mean, self.x_std = mean.to(Y.dtype), std.to(Y.dtype)
        self.values = yf.reshape(-1, *self.y_shape)
        return self

    def neighbours(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank indices ``(B, k)`` of the nearest entries, best first, and their cosine similarities ``(B, k)``."""
        self._check_x(X)
        q = F.normalize((X.reshape(X.shape[0], -1).double() - self.x_mean.double()) / self.x_std.double(), dim=1)
        sims = q @ self.keys.double().T  # (B, M)
        top = sims.topk(self.k, dim=1)
        return top.indices, top.values

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(B, L_tiny, d_tiny) -> (B, L_llm, d_llm): mean of the k nearest entries' Y."""
        idx, _ = self.neighbours(X)
        return self.values[idx].mean(1)  # (B, k, L, d) -> (B, L, d)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = {**self._base_config(), "k": self.k, "by_subset": self.by_subset, "standardize": self.standardize}
        return {"x_mean": self.x_mean, "x_std": self.x_std, "keys": self.keys, "values": self.values,
                "bank_ids": self.bank_ids}, config

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> NearestNeighbour:
        out = cls(k=config["k"], by_subset=config["by_subset"], standardize=config["standardize"])
        out._restore_shapes(config)
        cls._require(tensors, ["x_mean", "x_std", "keys", "values", "bank_ids"])
        out.x_mean, out.x_std, out.keys, out.values, out.bank_ids = (
            tensors[k] for k in ("x_mean", "x_std", "keys", "values", "bank_ids"))
        return out


BASELINES: dict[str, type[Baseline]] = {c.kind: c for c in (MeanUpdate, RidgeMap, NearestNeighbour)}
"""Baseline classes by ``kind`` (the name stored in a saved file)."""


# -------------------------------------------------------------------------- save / load


def save_baseline(baseline: Baseline, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a fitted baseline as one safetensors file (state tensors + JSON config and metadata).

    Args:
        baseline: a fitted baseline.
        path: the file; its directory is created. Written to a temporary name and renamed.
        metadata: JSON-able provenance (e.g. layout fingerprints, corpus id).

    Returns:
        The path.

    Raises:
        ValueError: if the baseline is not fitted or the metadata is not JSON-serializable.
    """
    tensors, config = baseline.to_state()
    try:
        header = {"format": BASELINE_FORMAT, "config": json.dumps(config, sort_keys=True, allow_nan=False),
                  "metadata": json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=False)}
    except (TypeError, ValueError) as err:
        raise ValueError(f"baseline config or metadata is not JSON-serializable: {err}") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(path, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, header))
    logger.info("saved %s baseline to %s", baseline.kind, path)
    return path


def load_baseline(path: str | Path) -> tuple[Baseline, dict[str, Any]]:
    """Read a baseline written by :func:`save_baseline`.

    Returns:
        (the baseline, its metadata dict).

    Raises:
        ValueError: if the file is missing, not a gt-ray baseline, or of an unknown kind.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"baseline file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("format") != BASELINE_FORMAT:
        raise ValueError(f"{path}: not a gt-ray baseline file (format {header.get('format')!r})")
    config = json.loads(header["config"])
    if config.get("kind") not in BASELINES:
        raise ValueError(f"{path}: unknown baseline kind {config.get('kind')!r}, known: {sorted(BASELINES)}")
    return BASELINES[config["kind"]].from_state(tensors, config), json.loads(header.get("metadata", "{}"))
