"""The teacher's discrete VP noise schedule, the N-step grid and the boundary scalings.

docs/method.md §1 (schedule), §2 (grid and timestep-value convention), §5 (consistency boundary condition).
All tables are float64; values are returned as float32 tensors shaped for broadcasting over
latents, so the ODE state stays in float32 whatever the UNet's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """SDXL's ``scaled_linear`` betas (docs/method.md §1), in float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def host_to(t, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.as_tensor(t).to(device, dtype)``: the plain host-to-device copy. The tables live on the host and small
    per-sample values are copied to the latents' device; a caller may inject another copy function with the same
    result (``NoiseSchedule(copy=...)``)."""
    return torch.as_tensor(t).to(device, dtype)


def _bcast(v: torch.Tensor, like: torch.Tensor, copy=host_to) -> torch.Tensor:
    return copy(v, like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Noise levels indexed by timestep *value* t in 0..T (docs/method.md §2).

    alpha_t = sqrt(alphas_cumprod[t-1]), sigma_t = sqrt(1 - alphas_cumprod[t-1]); t = 0 is clean data
    (alpha = 1, sigma = 0). beta(t) = T * betas[t-1] is the continuous-time VP rate used by Euler/Heun.
    """

    def __init__(self, betas: torch.Tensor, copy=host_to):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.copy = copy  # copy(t, device, dtype=None): the host-to-device copy of every small per-sample tensor
        self.T = int(betas.numel())
        self.betas = betas
        acp = torch.cumprod(1.0 - betas, 0)
        self.alphas_cumprod = acp
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self._alpha = torch.cat([one, acp.sqrt()])
        self._sigma = torch.cat([zero, (1.0 - acp).sqrt()])
        # beta(0) is undefined (docs/method.md §4); the table holds NaN there so that misuse is loud.
        self._beta = torch.cat([torch.full((1,), float("nan"), dtype=torch.float64), self.T * betas])

    @classmethod
    def from_scheduler(cls, scheduler, copy=host_to) -> "NoiseSchedule":
        """Build from a diffusers scheduler (its ``betas``), e.g. the teacher's ``scheduler`` folder."""
        cfg = scheduler.config
        if getattr(cfg, "prediction_type", "epsilon") != "epsilon":
            raise UserError(f"the teacher's scheduler predicts '{cfg.prediction_type}'; only epsilon "
                            "prediction (SDXL base) is supported")
        return cls(scheduler.betas.to(torch.float64), copy)

    @classmethod
    def sdxl(cls, copy=host_to) -> "NoiseSchedule":
        return cls(scaled_linear_betas(), copy)

    def _lookup(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device="cpu").long().reshape(-1)
        if t.numel() == 1 and like.shape[0] != 1:
            t = t.expand(like.shape[0])
        return _bcast(table[t], like, self.copy)

    def alpha(self, t, like):
        return self._lookup(self._alpha, t, like)

    def sigma(self, t, like):
        return self._lookup(self._sigma, t, like)

    def beta(self, t, like):
        return self._lookup(self._beta, t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps (DDPM ``add_noise`` at index t - 1), in float32."""
        x0, noise = x0.float(), noise.float()
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * noise

    def x0_from_eps(self, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """The DDIM data estimate (x - sigma_t eps) / alpha_t (docs/method.md §4, §5)."""
        return (x - self.sigma(t, x) * eps) / self.alpha(t, x)


def check_grid_size(T: int, N: int, flag: str = "--num_discr_timesteps") -> None:
    """The N-grid of docs/method.md §2 needs N to divide the T train timesteps; otherwise one line naming ``flag``."""
    if N <= 0 or T % N:
        divisors = [d for d in (10, 20, 25, 50, 100, 200, 250, 500, 1000) if T % d == 0]
        raise UserError(f"{flag} {N} must divide the model's {T} train timesteps (e.g. "
                        f"{', '.join(map(str, divisors))})")


def check_sampling_steps(K: int, N: int, where: str = "") -> None:
    """K sampling steps on the N-grid (docs/method.md §8) need 1 <= K <= N; otherwise one line (``where``: which
    grid, after 'the grid size N')."""
    if not 1 <= K <= N:
        raise UserError(f"--num_inference_steps {K} must lie in 1..{N} (the grid size N{where})")


@dataclass(frozen=True)
class Grid:
    """The N-interval discretisation of docs/method.md §2: start timesteps T, T-k, ..., k; next(t) = t - k."""

    T: int
    N: int

    def __post_init__(self):
        check_grid_size(self.T, self.N)

    @property
    def k(self) -> int:
        return self.T // self.N

    def timestep(self, index: torch.Tensor) -> torch.Tensor:
        """Grid index n (0 = noisiest) -> timestep value T - n k."""
        return self.T - self.k * torch.as_tensor(index).long()

    def start_timesteps(self) -> torch.Tensor:
        return self.timestep(torch.arange(self.N))

    def sampling_indices(self, K: int) -> list[int]:
        """docs/method.md §8: grid indices round(linspace(0, N, K, endpoint=False)) (NumPy's round-half-even)."""
        import numpy as np

        check_sampling_steps(K, self.N)
        return [int(i) for i in np.round(np.linspace(0, self.N, K, endpoint=False))]

    def sampling_timesteps(self, K: int) -> list[int]:
        return [self.T - self.k * i for i in self.sampling_indices(K)]


def boundary_scalings(t, like: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5, copy=host_to):
    """LCM-style c_skip, c_out (docs/method.md §5): c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x exactly."""
    t = torch.as_tensor(t, device="cpu").to(torch.float64).reshape(-1)
    if t.numel() == 1 and like.shape[0] != 1:
        t = t.expand(like.shape[0])
    ct = timestep_scaling * t
    c_skip = sigma_data**2 / (ct**2 + sigma_data**2)
    c_out = ct / (ct**2 + sigma_data**2).sqrt()
    return _bcast(c_skip, like, copy), _bcast(c_out, like, copy)
