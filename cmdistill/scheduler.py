"""A diffusers scheduler that runs test.py's multistep consistency sampler inside stock pipelines.

    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_lora_weights("runs/cm")
    pipe.scheduler = MultistepConsistencyScheduler.from_pretrained("runs/cm", subfolder="scheduler")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=0).images[0]

The sampling timesteps are the N-grid's at indices round(linspace(0, N, K, endpoint=False)) (``schedule.Grid``);
each step is the consistency function of ``sampling.consistency_fn`` (boundary scalings, x0 from eps as DDIM);
between steps the estimate is noised to the next sampling timestep with fresh Gaussian noise, and the last
step returns x0. Timestep values go to the UNet as they are (1000, ...), their noise level read at index t - 1,
as in training. The fresh noise comes from the pipeline's ``generator`` unless a noise source is set
(``set_noise_source``): ``evaluation_noise_source`` gives test.py's own, for samples equal to test.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .noise import per_sample_noise
from .sampling import consistency_fn
from .schedule import Grid, NoiseSchedule

NoiseSource = Callable[[int], torch.Tensor]


@dataclass
class MultistepConsistencySchedulerOutput(BaseOutput):
    """``prev_sample``: the input of the next step (the final sample after the last step); ``denoised``: x0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def evaluation_noise_source(seed: int, indices, shape) -> NoiseSource:
    """test.py's fresh noise for the captions ``indices`` (their rows of the batch): the j-th renoising
    draws ``noise.per_sample_noise(seed, indices, shape, stream=j + 1)``; the initial noise is stream 0,
    ``per_sample_noise(seed, indices, shape)``. ``shape``: one sample's latent shape, e.g. (4, 128, 128)."""
    indices, shape = list(indices), tuple(shape)
    return lambda j: per_sample_noise(seed, indices, shape, stream=j + 1)


class MultistepConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """Multistep consistency sampling on the N-grid of training as a diffusers scheduler.

    Use it with ``guidance_scale=0`` (the student is unguided). ``num_discr_timesteps`` is the training run's
    N (``--num_discr_timesteps``); ``timestep_scaling`` and ``sigma_data`` are the boundary scalings' c and s_d.
    ``set_timesteps(timesteps=[...])`` takes explicit timestep values (descending, in 1..T) instead of the grid's.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None,
                 num_discr_timesteps: int = 100, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        from diffusers import DDPMScheduler

        # The betas as diffusers computes them (float32), i.e. exactly the teacher scheduler's that test.py reads.
        betas = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule=beta_schedule, trained_betas=trained_betas).betas
        self.noise_schedule = NoiseSchedule(betas.to(torch.float64))
        self.grid = Grid(self.noise_schedule.T, num_discr_timesteps)  # checks that N divides T
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = self.grid.start_timesteps()
        self.noise_source: NoiseSource | None = None
        self._step_index = None

    @classmethod
    def for_training_run(cls, betas: torch.Tensor, num_discr_timesteps: int,
                         timestep_scaling: float = 10.0) -> "MultistepConsistencyScheduler":
        """The scheduler of a run whose teacher has ``betas``: the config names SDXL's schedule when the
        betas are SDXL's, and lists them otherwise."""
        betas = torch.as_tensor(betas, dtype=torch.float32).cpu()
        sdxl = torch.equal(betas, cls().noise_schedule.betas.float())
        return cls(num_train_timesteps=betas.numel(), trained_betas=None if sdxl else betas.tolist(),
                   num_discr_timesteps=num_discr_timesteps, timestep_scaling=timestep_scaling)

    def set_noise_source(self, source: NoiseSource | None) -> None:
        """``source(j)`` returns the fresh noise of the j-th renoising (j = 0 after the first step), a tensor
        of the latents' shape; ``None`` (the default) draws it from the pipeline's ``generator``. It stays
        set for later pipeline calls: set it for each batch."""
        self.noise_source = source

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        T, N = self.grid.T, self.grid.N
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if not ts or any(not 1 <= t <= T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps {ts} must be strictly decreasing timestep values in 1..{T}")
        else:
            if num_inference_steps is None or not 1 <= num_inference_steps <= N:
                raise ValueError(f"num_inference_steps {num_inference_steps} must lie in 1..{N}, the grid size "
                                 "(num_discr_timesteps) of this scheduler")
            ts = self.grid.sampling_timesteps(num_inference_steps)
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self.num_inference_steps = len(ts)
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    @property
    def step_index(self):
        return self._step_index

    def _index_of(self, timestep) -> int:
        hits = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of this scheduler's timesteps "
                             f"{self.timesteps.tolist()}: call set_timesteps first")
        return int(hits[0])

    def _fresh_noise(self, j: int, like: torch.Tensor, generator) -> torch.Tensor:
        if self.noise_source is None:
            return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        z = torch.as_tensor(self.noise_source(j))
        if tuple(z.shape) != tuple(like.shape):
            raise ValueError(f"the noise source gave shape {tuple(z.shape)} for latents of shape {tuple(like.shape)}")
        return z.to(like.device, like.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True):
        """x0 = f(x, t) from the UNet's eps; then x0 noised to the next sampling timestep, or x0 after the last.
        Computed in float32 (as test.py's sampler), returned in the sample's dtype."""
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        j, t = self._step_index, int(timestep)
        x, eps = sample.float(), model_output.float()
        batch = x.shape[0]
        x0 = consistency_fn(lambda *_: eps, x, torch.full((batch,), t), None, self.noise_schedule,
                            self.config.timestep_scaling, self.config.sigma_data)
        if j + 1 < len(self.timesteps):
            s = int(self.timesteps[j + 1])
            prev = self.noise_schedule.add_noise(x0, self._fresh_noise(j, x0, generator), torch.full((batch,), s))
        else:
            prev = x0
        self._step_index += 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return MultistepConsistencySchedulerOutput(prev_sample=prev, denoised=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
