"""Exact denoisers for Gaussian and Gaussian-mixture data: closed-form oracles for tests.

For data x_0 ~ N(mu, Sigma) in D = C*H*W dimensions and x_t = (1 - t) x_0 + t eps (ddm.expert.flow),
x_t ~ N(a mu, S) with a = 1 - t and S = a^2 Sigma + t^2 I, and the marginal (optimal) velocity is

    v(x_t, t) = E[eps - x_0 | x_t] = (t I - a Sigma) S^{-1} (x_t - a mu) - mu,

from the Gaussian conditioning formulas E[x_0 | x_t] = mu + a Sigma S^{-1} (x_t - a mu) and
E[eps | x_t] = t S^{-1} (x_t - a mu). We evaluate it in Sigma's eigenbasis (Sigma = U diag(lam) U^T),
where S is diagonal with entries a^2 lam + t^2, so every sample may carry its own t at O(D^2) cost.

For a mixture sum_k w_k N(mu_k, Sigma_k) the marginal velocity is sum_k p(k | x_t) v_k(x_t), the exact
form the DDM router approximates, with p(k | x_t) proportional to w_k N(x_t; a mu_k, S_k).

Endpoints: covariances must be positive definite, so a^2 lam + t^2 >= lam / (1 + lam) > 0 on all of
t in [0, 1] and both ends are evaluated exactly, no clamping (at t = 0, v = -x_t; at t = 1,
v = x_t - E[x_0] and p(k | x_1) = w_k). Approximate point masses with a small variance (e.g. 1e-4 I).

Everything runs in float64; inputs of any float dtype are accepted and outputs come back in it.
Labels are ignored (the data is unconditional), but ``num_classes`` is there so these plug into the
samplers and guidance like any Denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _as_f64(x: torch.Tensor | Sequence[float], name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


def _flat_inputs(x_t: torch.Tensor, t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) x_t and (N,) or scalar t -> float64 (N, D) and (N, 1), validated."""
    n = x_t.shape[0] if x_t.ndim else 0
    if x_t.ndim < 2 or x_t[0].numel() != dim:
        raise ValueError(
            f"x_t must have shape (N, ...) with {dim} values per sample (the data dimension), "
            f"got {tuple(x_t.shape)}"
        )
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must have shape (N,) = ({n},), got {tuple(t.shape)}")
    t64 = t.detach().to(device="cpu", dtype=torch.float64).reshape(n, 1)  # (N, 1)
    if (t64 < 0).any() or (t64 > 1).any():
        raise ValueError(f"t must lie in [0, 1], got range [{float(t64.min())}, {float(t64.max())}]")
    return x_t.detach().to(device="cpu", dtype=torch.float64).reshape(n, dim), t64


class GaussianDenoiser:
    """Exact marginal velocity for data x_0 ~ N(mean, cov).

    mean: (D,) or an image shape such as (C, H, W) with C*H*W = D (that shape is used by ``sample_x0``).
    cov: (D, D), symmetric positive definite.
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, num_classes: int = 1):
        mean64 = _as_f64(mean, "mean")
        cov64 = _as_f64(cov, "cov")
        if mean64.ndim == 0:
            raise ValueError("mean must have at least one dimension: (D,) or (C, H, W)")
        dim = mean64.numel()
        if cov64.shape != (dim, dim):
            raise ValueError(
                f"cov must have shape (D, D) = ({dim}, {dim}) for a mean of {dim} values, "
                f"got {tuple(cov64.shape)}"
            )
        if not torch.allclose(cov64, cov64.T, rtol=1e-6, atol=1e-10):
            raise ValueError("cov must be symmetric")
        evals, evecs = torch.linalg.eigh(0.5 * (cov64 + cov64.T))  # (D,), (D, D) columns = eigenvectors
        if evals.min() <= 0:
            raise ValueError(
                f"cov must be positive definite (smallest eigenvalue {float(evals.min()):.3g}); "
                "add a small multiple of the identity, e.g. 1e-4 * I"
            )
        self.image_shape: tuple[int, ...] = tuple(mean64.shape)
        self.dim = dim
        self.num_classes = num_classes
        self.mean = mean64.reshape(dim)  # (D,)
        self.cov = cov64
        self._evals = evals  # (D,)
        self._evecs = evecs  # (D, D)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _velocity_logpdf(
        self, x: torch.Tensor, t: torch.Tensor, with_logpdf: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float64 core on flat inputs x (N, D), t (N, 1): velocity (N, D) and log N(x; a mu, S) (N,)."""
        a = 1 - t  # (N, 1)
        z = (x - a * self.mean) @ self._evecs  # (N, D) residual in the eigenbasis
        s = a * a * self._evals + t * t  # (N, D) diagonal of S in the eigenbasis, > 0
        v = ((t - a * self._evals) / s * z) @ self._evecs.T - self.mean  # (N, D)
        if not with_logpdf:
            return v, None
        logpdf = -0.5 * (torch.log(s).sum(1) + (z * z / s).sum(1) + self.dim * math.log(2 * math.pi))  # (N,)
        return v, logpdf

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[eps - x_0 | x_t] for x_t (N, ...), t (N,); labels ignored. Same shape and dtype as x_t."""
        x, t64 = _flat_inputs(x_t, t, self.dim)
        v, _ = self._velocity_logpdf(x, t64, with_logpdf=False)
        return v.reshape(x_t.shape).to(device=x_t.device, dtype=x_t.dtype)

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t) = log N(x_t; (1 - t) mu, (1 - t)^2 Sigma + t^2 I), shape (N,), float64."""
        x, t64 = _flat_inputs(x_t, t, self.dim)
        return self._velocity_logpdf(x, t64)[1]

    def sample_x0(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """n data samples, shape (n, *image_shape)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)  # (n, D)
        x0 = self.mean + (z * self._evals.sqrt()) @ self._evecs.T  # (n, D)
        return x0.reshape(n, *self.image_shape).to(dtype)


class GaussianMixtureDenoiser:
    """Exact marginal velocity and component posterior for data x_0 ~ sum_k w_k N(mu_k, Sigma_k).

    weights: (K,) positive, normalised here. means: (K, D) or (K, C, H, W). covs: (K, D, D).
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, num_classes: int = 1):
        w = _as_f64(weights, "weights")
        means64 = _as_f64(means, "means")
        covs64 = _as_f64(covs, "covs")
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {tuple(w.shape)}")
        k = w.numel()
        if (w <= 0).any():
            raise ValueError(f"weights must be positive, got {w.tolist()}")
        if means64.ndim < 2 or means64.shape[0] != k:
            raise ValueError(
                f"means must have shape (K, D) or (K, C, H, W) with K = {k}, got {tuple(means64.shape)}"
            )
        if covs64.ndim != 3 or covs64.shape[0] != k:
            raise ValueError(f"covs must have shape (K, D, D) with K = {k}, got {tuple(covs64.shape)}")
        self.components = [GaussianDenoiser(means64[i], covs64[i], num_classes=num_classes) for i in range(k)]
        self.weights = w / w.sum()  # (K,)
        self.num_classes = num_classes
        self.dim = self.components[0].dim
        self.image_shape = self.components[0].image_shape

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_components(self) -> int:
        return len(self.components)

    def component(self, k: int) -> GaussianDenoiser:
        """The k-th component alone: the exact "expert" for data partition k."""
        if not 0 <= k < self.num_components:
            raise ValueError(f"component index must be in [0, {self.num_components}), got {k}")
        return self.components[k]

    def _posterior_velocities(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 core: posterior (N, K) and per-component velocities (K, N, D)."""
        vs, logps = zip(*(c._velocity_logpdf(x, t) for c in self.components))
        log_joint = torch.stack(logps, 1) + self.weights.log()  # (N, K)
        post = torch.softmax(log_joint, dim=1)  # (N, K), log-sum-exp stable
        return post, torch.stack(vs)  # (N, K), (K, N, D)

    def posterior(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p(k | x_t) for x_t (N, ...), t (N,) -> (N, K) in x_t's dtype; rows sum to 1."""
        x, t64 = _flat_inputs(x_t, t, self.dim)
        post, _ = self._posterior_velocities(x, t64)
        return post.to(device=x_t.device, dtype=x_t.dtype)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k p(k | x_t) v_k(x_t) for x_t (N, ...), t (N,); labels ignored. Same shape/dtype as x_t."""
        x, t64 = _flat_inputs(x_t, t, self.dim)
        post, vs = self._posterior_velocities(x, t64)
        v = torch.einsum("nk,knd->nd", post, vs)  # (N, D)
        return v.reshape(x_t.shape).to(device=x_t.device, dtype=x_t.dtype)

    def sample_x0(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n data samples (n, *image_shape) and their component labels (n,) long: partition-labelled data."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        x0 = torch.empty(n, *self.image_shape, dtype=dtype)
        for i, comp in enumerate(self.components):
            idx = (k == i).nonzero().squeeze(1)
            if idx.numel():
                x0[idx] = comp.sample_x0(idx.numel(), generator=generator, dtype=dtype)
        return x0, k


class ClassConditionalMixture:
    """Class-conditional, partitioned Gaussian-mixture data with every velocity and posterior in closed form:
    the exact experts, router and monolith of DDM on data where all three are known.

    Data: component (k, c) is partition k's class c, x_0 ~ N(mu_kc, Sigma_kc) with probability pi_kc.
    weights: (K, C) non-negative pi_kc (normalised here; a zero means class c has no data in partition
    k; every class and every partition needs some). means: (K, C, D) or (K, C, *image_shape). covs:
    (K, C, D, D). Labels y in [0, C) are classes, y == C (``null_label``) is unconditional.

    * ``expert(k)``: the exact expert of partition k, v_k(x_t, t, c) = the velocity of component (k, c)
      (for a class partition k lacks, where the router's p(k | x_t, t, c) is exactly 0, its unconditional
      velocity), v_k(x_t, t, null) = partition k's mixture velocity;
    * ``router(x_t, t, y)``: the exact p(k | x_t, t, c), and p(k | x_t, t) for the null label;
    * ``velocity(x_t, t, y)``: the monolith's exact conditional (or, null label, unconditional) velocity.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor):
        w = _as_f64(weights, "weights")
        means64, covs64 = _as_f64(means, "means"), _as_f64(covs, "covs")
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"weights must have shape (K, C) (partitions x classes), got {tuple(w.shape)}")
        k, c = w.shape
        if (w < 0).any() or (w.sum(0) <= 0).any() or (w.sum(1) <= 0).any():
            raise ValueError(
                "weights must be >= 0 with data in every partition (row) and every class (column)"
            )
        if means64.ndim < 3 or tuple(means64.shape[:2]) != (k, c):
            raise ValueError(
                f"means must have shape (K, C, D) with (K, C) = ({k}, {c}), got {tuple(means64.shape)}"
            )
        if covs64.ndim != 4 or tuple(covs64.shape[:2]) != (k, c):
            raise ValueError(
                f"covs must have shape (K, C, D, D) with (K, C) = ({k}, {c}), got {tuple(covs64.shape)}"
            )
        self.components = [
            [GaussianDenoiser(means64[i, j], covs64[i, j], c) for j in range(c)] for i in range(k)
        ]
        self.log_weights = (w / w.sum()).log()  # (K, C), -inf where a class is absent from a partition
        self.num_experts, self.num_classes = k, c
        self.dim = self.components[0][0].dim
        self.image_shape = self.components[0][0].image_shape

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _terms(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        """Flat float64 inputs, per-component velocities V (K, C, N, D), log pi_kc + log N_t (K, C, N), labels."""
        x, t64 = _flat_inputs(x_t, t, self.dim)
        vs, logps = [], []
        for row in self.components:
            v_row, lp_row = zip(*(g._velocity_logpdf(x, t64) for g in row))
            vs.append(torch.stack(v_row))
            logps.append(torch.stack(lp_row))
        v, log_joint = (
            torch.stack(vs),
            torch.stack(logps) + self.log_weights[:, :, None],
        )  # (K,C,N,D), (K,C,N)
        n = x.shape[0]
        labels = torch.full((n,), self.null_label) if y is None else torch.as_tensor(y).to("cpu").long()
        if labels.shape != (n,) or (labels < 0).any() or (labels > self.null_label).any():
            raise ValueError(
                f"y must be (N,) = ({n},) labels in [0, {self.null_label}] ({self.null_label} = null)"
            )
        return v, log_joint, labels

    @staticmethod
    def _conditional(log_joint: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, N) log pi_k,y_i + log N_t(x_i; k, y_i): each row's class picked out."""
        idx = labels.clamp(max=log_joint.shape[1] - 1)  # null rows are overwritten by the caller
        return log_joint.gather(1, idx[None, None, :].expand(log_joint.shape[0], 1, -1)).squeeze(1)

    def _posterior(self, log_joint: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(k | x_t, t, y) (N, K): over the row's class, or over all classes for the null label."""
        null = (labels == self.null_label)[None, :]  # (1, N)
        log_k = torch.where(null, log_joint.logsumexp(1), self._conditional(log_joint, labels))  # (K, N)
        return torch.softmax(log_k, dim=0).T  # (N, K)

    def class_posterior(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p(c | x_t, t) over the classes, (N, C) float64 (at t = 0: the Bayes classifier of the data)."""
        _, log_joint, _ = self._terms(x_t, t, None)
        return torch.softmax(log_joint.logsumexp(0), dim=0).T  # (N, C)

    def router(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The exact router p(k | x_t, t, y), (N, K) in x_t's dtype; the null label gives p(k | x_t, t)."""
        _, log_joint, labels = self._terms(x_t, t, y)
        return self._posterior(log_joint, labels).to(device=x_t.device, dtype=x_t.dtype)

    def expert(self, k: int) -> _PartitionExpert:
        """The exact expert of partition k (a Denoiser with this data's ``num_classes``)."""
        if not 0 <= k < self.num_experts:
            raise ValueError(f"expert index must be in [0, {self.num_experts}), got {k}")
        return _PartitionExpert(self, k)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The monolith: E[eps - x_0 | x_t, y] over all partitions (all components for the null label)."""
        v, log_joint, labels = self._terms(x_t, t, y)
        post = self._posterior(log_joint, labels)  # (N, K)
        v_kc = self._expert_velocities(v, log_joint, labels)  # (K, N, D)
        out = torch.einsum("nk,knd->nd", post, v_kc)  # (N, D)
        return out.reshape(x_t.shape).to(device=x_t.device, dtype=x_t.dtype)

    def _expert_velocities(
        self, v: torch.Tensor, log_joint: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(K, N, D) v_k(x_t, t, y_i) for every expert k: component (k, y_i), or partition k's mixture for the
        null label and for a class partition k lacks."""
        within = torch.softmax(log_joint, dim=1)  # (K, C, N) p(c | x_t, t, k)
        v_uncond = torch.einsum("kcn,kcnd->knd", within, v)  # (K, N, D)
        idx = labels.clamp(max=self.num_classes - 1)
        v_cond = v[:, idx, torch.arange(labels.shape[0])]  # (K, N, D)
        present = torch.isfinite(self.log_weights[:, idx])  # (K, N)
        use_cond = present & (labels != self.null_label)[None, :]
        return torch.where(use_cond[:, :, None], v_cond, v_uncond)

    def sample_x0(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n data samples (n, *image_shape), their class labels (n,) and partition labels (n,)."""
        flat = torch.multinomial(self.log_weights.exp().reshape(-1), n, replacement=True, generator=generator)
        k, c = flat // self.num_classes, flat % self.num_classes
        x0 = torch.empty(n, *self.image_shape, dtype=dtype)
        for i in range(self.num_experts):
            for j in range(self.num_classes):
                idx = ((k == i) & (c == j)).nonzero().squeeze(1)
                if idx.numel():
                    x0[idx] = self.components[i][j].sample_x0(idx.numel(), generator=generator, dtype=dtype)
        return x0, c, k


class _PartitionExpert:
    """Expert k of a :class:`ClassConditionalMixture`: the exact velocity of partition k's data."""

    def __init__(self, data: ClassConditionalMixture, k: int):
        self.data, self.k = data, k
        self.num_classes = data.num_classes

    @property
    def null_label(self) -> int:
        return self.num_classes

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v, log_joint, labels = self.data._terms(x_t, t, y)
        out = self.data._expert_velocities(v, log_joint, labels)[self.k]  # (N, D)
        return out.reshape(x_t.shape).to(device=x_t.device, dtype=x_t.dtype)
