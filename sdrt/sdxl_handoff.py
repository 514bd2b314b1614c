"""SDXL's base -> refiner handoff ("ensemble of expert denoisers"): `denoising_end` stops a call part-way through
its schedule (the base, output="latent"), `denoising_start` begins one there (the refiner, given those latents as
image=), both with diffusers' discrete timestep cutoff:

    cutoff = int(round(num_train_timesteps * (1 - fraction)))
    denoising_end:   keep the steps (from the start) whose timestep >= cutoff
    denoising_start: run the steps whose timestep < cutoff; strength is then ignored, and the image latents
                     are the start as they are (no noise added), as diffusers' add_noise=False

Each side keeps its full schedule's tables (a cut run's last step still goes to the next sigma, not to zero), so
base(denoising_end=f) then refiner(denoising_start=f) with the same steps and scheduler runs the whole schedule
once. diffusers' extra step for second-order schedulers does not arise: sdrt's are all first order.
Fractions must lie strictly between 0 and 1 (diffusers silently ignores others; sdrt refuses them).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional

from sdrt.errors import InvalidInputError
from sdrt.schedulers import Schedule, Scheduler


def check_fraction(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < float(value) < 1:
        raise InvalidInputError(f"{name} must be None or a number strictly between 0 and 1, got {value!r:.80}")
    return float(value)


def cutoff(scheduler: Scheduler, fraction: float) -> int:
    n = scheduler.num_train_timesteps
    return int(round(n - fraction * n))


def handoff_range(scheduler: Scheduler, schedule: Schedule, start: int, denoising_start: Optional[float],
                  denoising_end: Optional[float]) -> tuple[Schedule, int]:
    """A call's (schedule, start index) -> those of its part: from denoising_start's first step (then `schedule`
    must be the full one, strength 1) and cut after denoising_end's last step. Refuses a part without steps."""
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise InvalidInputError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
    timesteps = schedule.timesteps.cpu()
    if denoising_start is not None:
        start = len(timesteps) - int((timesteps < cutoff(scheduler, denoising_start)).sum())
    end = len(timesteps)
    if denoising_end is not None:
        end = start + int((timesteps[start:] >= cutoff(scheduler, denoising_end)).sum())
    if end <= start:
        raise InvalidInputError(f"denoising_start={denoising_start}, denoising_end={denoising_end} leave no step of "
                                f"this schedule (timesteps {timesteps.tolist()}); use more steps or other fractions")
    return (schedule if end == len(timesteps) else truncated(schedule, end)), start


def truncated(schedule: Schedule, end: int) -> Schedule:
    """The schedule's first `end` steps (every per-step table is [n], indexed by step)."""
    return dataclasses.replace(
        schedule, timesteps=schedule.timesteps[:end], noise_steps=schedule.noise_steps[:end],
        input_scale=None if schedule.input_scale is None else schedule.input_scale[:end],
        noised_x0=schedule.noised_x0[:end], noised_noise=schedule.noised_noise[:end],
        tables={k: v[:end] for k, v in schedule.tables.items()})
