"""Noise schedulers as explicit, stateless steps: DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++ 2M, LCM.

Each one reproduces the `step` of the diffusers scheduler of the same kind (checked against diffusers 0.42),
configured from a model folder's `scheduler/scheduler_config.json`, so a seed gives the same trajectory in both.

Interface (the pipeline's loop)::

    sched = make_scheduler(name, config, eta)           # name=None: the config's own `_class_name`
    sch = sched.set_timesteps(steps, device, strength=strength)
    start = sched.start_index(steps, strength)          # 0 for txt2img (strength=1.0)
    x = x * sch.init_noise_sigma                        # txt2img; img2img: x = sched.add_noise(x0, noise, start, sch)
    state = sched.init_state(x)
    for i in range(start, len(sch.timesteps)):
        out = unet(sched.scale_model_input(x, i, sch), sch.timesteps[i], ctx)   # CFG: sdrt.guidance
        noise = randn(x.shape, generator=g, dtype=out.dtype) if sch.noise_steps[i] else None
        x = sched.step(out, i, x, sch, noise=noise, state=state)

Design:
- `set_timesteps` returns a fresh `Schedule`: every per-step coefficient precomputed as a [n] tensor on the
  device (computed in float64 from diffusers' float32 base tables, then stored in `dtype`). `step` takes the
  step index `i` as a Python int, indexes those tables, and never calls `.item()`, syncs, or mutates Python
  state, so a whole loop can be captured in one CUDA graph. Which steps consume noise is fixed per index and
  known up front (`Schedule.noise_steps`).
- DPM-Solver++ 2M is multistep: `init_state` returns a `MultistepState` whose tensors `step` updates IN PLACE
  (the previous x0 prediction, and a 0/1 flag that makes the first executed step first order, as diffusers'
  `lower_order_nums` does, also when img2img starts mid-schedule). Every other scheduler's state is None.
- Noise: stochastic schedulers take their noise as an argument. Draw it with the sample's shape from the
  pipeline's generator exactly when `schedule.noise_steps[i]` is True; that is where diffusers draws it
  (DDIM with eta > 0: every step; DDPM: steps with t > 0; Euler ancestral: every step; LCM: every step but
  the last), so with the same generator the draws match diffusers' `step(..., generator=g)`.
- Arithmetic runs in the sample's dtype promoted to at least float32 (diffusers upcasts Euler and DPM steps
  to float32 too); the result comes back in the sample's dtype.
- img2img: `start_index(steps, strength)` is diffusers' `get_timesteps`: init=min(int(steps*strength), steps),
  start=steps-init. A strength that leaves no denoising step (strength*steps < 1, strength=0.0 included)
  raises InvalidInputError: sdrt refuses it rather than silently returning the input. LCM is the exception,
  as in diffusers' LCM img2img pipeline: its table itself depends on the strength
  (`set_timesteps(steps, strength=...)`) and denoising starts at index 0. For every other scheduler
  `set_timesteps` ignores `strength`.
- `add_noise(original, noise, i, schedule)` noises clean latents to the level of step i, as that scheduler's
  diffusers `add_noise` does: sqrt(acp)*x0 + sqrt(1-acp)*noise (DDIM, DDPM, LCM), x0 + sigma*noise (Euler
  types, whose init_noise_sigma is > 1), alpha_t*x0 + sigma_t*noise (DPM-Solver).

Configuration: keys a diffusers scheduler class reads are read with that class's defaults (so DDIM and
Euler differ on `timestep_spacing` defaults exactly as `XScheduler.from_config(cfg)` does, `_use_default_values`
included). Supported: beta_schedule linear/scaled_linear or trained_betas, num_train_timesteps, steps_offset,
set_alpha_to_one, timestep_spacing leading/trailing/linspace, prediction_type epsilon/v_prediction,
clip_sample (+ clip_sample_range), rescale_betas_zero_snr, DDPM variance_type fixed_small/fixed_small_log/
fixed_large, Euler use_karras_sigmas/sigma_min/sigma_max/final_sigmas_type, DPM final_sigmas_type/
lower_order_final/euler_at_final/lambda_min_clipped, LCM original_inference_steps/timestep_scaling. Anything
else that would change the math (thresholding, other solvers, log_linear interpolation, ...) raises
InvalidInputError listing the supported values. The name fixes the algorithm: `dpmpp_2m` and
`dpmpp_2m_karras` force algorithm_type dpmsolver++, solver_order 2 and use_karras_sigmas off/on whatever the
config says; a config of an unknown class (PNDM, UniPC, ...) gets `ddim` with that config's settings.
`Schedule.tables` holds each scheduler's own per-step coefficients (names are private to this module).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from sdrt.checks import check_strength
from sdrt.errors import InvalidInputError

logger = logging.getLogger(__name__)

SCHEDULER_NAMES: tuple[str, ...] = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm")

_ALIASES = {"euler_ancestral": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a",
            "k_dpmpp_2m": "dpmpp_2m", "dpmpp_2m_k": "dpmpp_2m_karras", "k_dpmpp_2m_karras": "dpmpp_2m_karras"}

_CLASS_TO_NAME = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
                  "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpmpp_2m",
                  "LCMScheduler": "lcm"}


@dataclass(frozen=True)
class Schedule:
    """The tables of one `set_timesteps` call. Tensors are [n] on the requested device."""

    timesteps: Tensor              # what the UNet gets at step i: int64, or float32 for Euler types (as diffusers)
    init_noise_sigma: float        # txt2img starts from randn * init_noise_sigma
    noise_steps: tuple[bool, ...]  # step i consumes a noise tensor
    input_scale: Optional[Tensor]  # scale_model_input multiplier; None = identity
    noised_x0: Tensor              # add_noise at step i: noised_x0[i] * x0 + noised_noise[i] * noise
    noised_noise: Tensor
    tables: Mapping[str, Tensor]   # the scheduler's own step coefficients


class RawSchedule(NamedTuple):
    """What a scheduler's `_build` computes on the CPU in float64; `set_timesteps` moves it into a `Schedule`."""

    timesteps: Tensor
    noise_steps: Sequence[bool]
    init_noise_sigma: float
    input_scale: Optional[Tensor]
    noised_x0: Tensor
    noised_noise: Tensor
    tables: Mapping[str, Tensor]


@dataclass(frozen=True)
class MultistepState:
    """DPM-Solver++ 2M memory, updated in place by `step`."""

    prev_x0: Tensor   # x0 prediction of the previous executed step
    has_prev: Tensor  # 0-d: 0 before the first executed step, then 1


def normalize_name(name: str) -> str:
    """`"DPM++ 2M Karras"` -> `"dpmpp_2m_karras"`; raises InvalidInputError for unknown names."""
    if not isinstance(name, str):
        raise InvalidInputError(f"scheduler must be a string, one of {', '.join(SCHEDULER_NAMES)}; got {name!r}")
    key = name.strip().lower().replace("++", "pp").replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in SCHEDULER_NAMES:
        raise InvalidInputError(f"scheduler={name!r} is unknown; choose one of {', '.join(SCHEDULER_NAMES)}")
    return key


def make_scheduler(name: Optional[str], config: Mapping[str, Any], eta: float = 0.0) -> "Scheduler":
    """A scheduler named `name` (or the one `config["_class_name"]` names when None), configured from the
    parsed diffusers `scheduler_config.json`. `eta` is DDIM's noise weight (0 = deterministic); others ignore it."""
    if not isinstance(config, Mapping):
        raise InvalidInputError(f"config must be a dict parsed from scheduler_config.json, got {type(config).__name__}")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise InvalidInputError(f"eta must be a finite number >= 0, got {eta!r}")
    eta = float(eta)
    if name is None:
        cls_name = config.get("_class_name")
        name = _CLASS_TO_NAME.get(cls_name)
        if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
            name = "dpmpp_2m_karras"
        if name is None:
            log = logger.info if cls_name == "PNDMScheduler" else logger.warning
            log("scheduler config class %r has no sdrt counterpart; using ddim with its settings", cls_name)
            name = "ddim"
    else:
        name = normalize_name(name)
    cls, overrides = _SCHEDULERS[name]
    return cls(name, config, overrides, float(eta))


# ------------------------------------------------------------------------------------- shared helpers
_COMMON_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0,
                    "rescale_betas_zero_snr": False}


def _resolve_config(name: str, config: Mapping[str, Any], defaults: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> dict:
    """The values a diffusers `XScheduler.from_config(config, **overrides)` would end up with."""
    used_defaults = set(config.get("_use_default_values", ()))
    cfg = dict(defaults)
    cfg.update({k: v for k, v in config.items() if k in defaults and k not in used_defaults})
    cfg.update(overrides)
    return cfg


def _require(name: str, cfg: Mapping[str, Any], key: str, allowed: tuple) -> Any:
    value = cfg[key]
    if value not in allowed:
        raise InvalidInputError(f"scheduler config {key}={value!r} is not supported by sdrt's {name} scheduler "
                                f"(supported: {', '.join(repr(a) for a in allowed)})")
    return value


def _alphas_cumprod(name: str, cfg: Mapping[str, Any], zero_snr_floor: bool) -> Tensor:
    """float32 [N] cumulative alphas, built exactly as diffusers builds them (float32 ops)."""
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif _require(name, cfg, "beta_schedule", ("linear", "scaled_linear")) == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    else:
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    acp = torch.cumprod(1.0 - betas, dim=0)
    if cfg["rescale_betas_zero_snr"] and zero_snr_floor:
        acp[-1] = 2**-24  # sigma-parameterized schedulers cannot hold sigma = inf
    return acp


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32 as diffusers."""
    sqrt_acp = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp**2
    alphas = torch.cat([acp[0:1], acp[1:] / acp[:-1]])
    return 1 - alphas


def _spaced_timesteps(spacing: str, steps: int, num_train: int, offset: int) -> np.ndarray:
    """diffusers' `timestep_spacing` rules, descending, float64 (linspace not yet rounded)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + offset
    ratio = num_train / steps  # trailing
    return np.round(np.arange(num_train, 0, -ratio)) - 1


def _karras(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by log-linear interpolation (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _check_steps(steps: Any, num_train: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= num_train:
        raise InvalidInputError(f"steps must be an integer in [1, {num_train}], got {steps!r}")
    return int(steps)


def _f64(x) -> Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ---------------------------------------------------------------------------------------------- base
class Scheduler:
    """One sampler. Holds only its configuration; every per-run table lives in the `Schedule`."""

    name: str
    prediction_type: str
    _DEFAULTS: Mapping[str, Any] = {}

    def __init__(self, name: str, config: Mapping[str, Any], overrides: Mapping[str, Any], eta: float):
        self.name = name
        self.eta = eta
        self.cfg = _resolve_config(name, config, {**_COMMON_DEFAULTS, **self._DEFAULTS}, overrides)
        self.prediction_type = _require(name, self.cfg, "prediction_type", ("epsilon", "v_prediction"))
        self.num_train_timesteps = int(self.cfg["num_train_timesteps"])
        if self.cfg.get("thresholding"):
            _require(name, self.cfg, "thresholding", (False,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, prediction_type={self.prediction_type!r})"

    # -- the interface
    def set_timesteps(self, steps: int, device=None, dtype: torch.dtype = torch.float32,
                      strength: float = 1.0) -> Schedule:
        steps = _check_steps(steps, self.num_train_timesteps)
        strength = check_strength(strength)
        if dtype not in (torch.float32, torch.float64):
            raise InvalidInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        raw = self._build(steps, strength)
        to = dict(device=device, dtype=dtype)
        return Schedule(timesteps=raw.timesteps.to(device), init_noise_sigma=float(raw.init_noise_sigma),
                        noise_steps=tuple(bool(b) for b in raw.noise_steps),
                        input_scale=None if raw.input_scale is None else raw.input_scale.to(**to),
                        noised_x0=raw.noised_x0.to(**to), noised_noise=raw.noised_noise.to(**to),
                        tables={k: v.to(**to) for k, v in raw.tables.items()})

    def scale_model_input(self, sample: Tensor, i: int, schedule: Schedule) -> Tensor:
        if schedule.input_scale is None:
            return sample
        return (sample * schedule.input_scale[i]).to(sample.dtype)

    def init_state(self, sample: Tensor) -> Optional[MultistepState]:
        return None

    def add_noise(self, original: Tensor, noise: Tensor, i: int, schedule: Schedule) -> Tensor:
        x = schedule.noised_x0[i] * original + schedule.noised_noise[i] * noise
        return x.to(original.dtype)

    def start_index(self, steps: int, strength: float) -> int:
        steps = _check_steps(steps, self.num_train_timesteps)
        strength = check_strength(strength)
        init_timestep = min(int(steps * strength), steps)
        if init_timestep == 0:
            raise InvalidInputError(f"strength={strength} with steps={steps} leaves no denoising step; "
                                    f"strength must be at least 1/steps = {1 / steps:.4g}")
        return max(steps - init_timestep, 0)

    def step(self, model_output: Tensor, i: int, sample: Tensor, schedule: Schedule,
             noise: Optional[Tensor] = None, state: Optional[MultistepState] = None) -> Tensor:
        """x at step i -> x at step i+1. `noise` exactly when `schedule.noise_steps[i]`."""
        if schedule.noise_steps[i] != (noise is not None):
            raise InvalidInputError(f"noise must be {'a tensor' if schedule.noise_steps[i] else 'None'} "
                                    f"at step {i} of the {self.name} scheduler")
        ctype = torch.promote_types(sample.dtype, torch.float32)
        out = self._step(model_output.to(ctype), i, sample.to(ctype), schedule.tables,
                         None if noise is None else noise.to(ctype), state)
        return out.to(sample.dtype)

    # -- per scheduler
    def _build(self, steps: int, strength: float) -> RawSchedule:
        raise NotImplementedError

    def _step(self, m: Tensor, i: int, x: Tensor, t: Mapping[str, Tensor], noise: Optional[Tensor],
              state: Optional[MultistepState]) -> Tensor:
        raise NotImplementedError


def _x0_from_alpha(sqrt_a: Tensor, sqrt_b: Tensor, prediction_type: str) -> dict:
    """x0 = x0_x * x + x0_m * model_output, for x = sqrt(acp) x0 + sqrt(1-acp) eps."""
    if prediction_type == "epsilon":
        return {"x0_x": 1 / sqrt_a, "x0_m": -sqrt_b / sqrt_a}
    return {"x0_x": sqrt_a, "x0_m": -sqrt_b}


def _x0_from_sigma(sigma: Tensor, prediction_type: str) -> dict:
    """x0 = x0_x * x + x0_m * model_output, for x = x0 + sigma eps (Euler types)."""
    if prediction_type == "epsilon":
        return {"x0_x": torch.ones_like(sigma), "x0_m": -sigma}
    return {"x0_x": 1 / (sigma**2 + 1), "x0_m": -sigma / (sigma**2 + 1) ** 0.5}


class _AlphaScheduler(Scheduler):
    """DDIM, DDPM and LCM: integer timesteps into the alphas_cumprod table, optional x0 clipping."""

    def __init__(self, name, config, overrides, eta):
        super().__init__(name, config, overrides, eta)
        self.acp = _alphas_cumprod(name, self.cfg, zero_snr_floor=False)
        self.clip_range = float(self.cfg["clip_sample_range"]) if self.cfg["clip_sample"] else None

    def _x0(self, m: Tensor, i: int, x: Tensor, t: Mapping[str, Tensor]) -> Tensor:
        x0 = t["x0_x"][i] * x + t["x0_m"][i] * m
        return x0 if self.clip_range is None else x0.clamp(-self.clip_range, self.clip_range)

    def _noised(self, acp_t: Tensor) -> tuple[Tensor, Tensor]:
        return acp_t.sqrt(), (1 - acp_t).sqrt()

    def _spaced(self, steps: int) -> np.ndarray:
        spacing = _require(self.name, self.cfg, "timestep_spacing", ("leading", "trailing", "linspace"))
        ts = _spaced_timesteps(spacing, steps, self.num_train_timesteps, int(self.cfg["steps_offset"]))
        ts = ts.round().astype(np.int64)
        if ts.max() >= self.num_train_timesteps:
            raise InvalidInputError(f"steps={steps} with steps_offset={self.cfg['steps_offset']} runs past "
                                    f"num_train_timesteps={self.num_train_timesteps}; use fewer steps")
        return ts


# ---------------------------------------------------------------------------------------------- DDIM
class DDIM(_AlphaScheduler):
    _DEFAULTS = {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
                 "timestep_spacing": "leading", "thresholding": False}

    def _build(self, steps, strength):
        ts = self._spaced(steps)
        acp = _f64(self.acp)
        final = 1.0 if self.cfg["set_alpha_to_one"] else acp[0]
        # diffusers steps back by a fixed stride whatever the spacing, not to the next table entry
        prev = ts - self.num_train_timesteps // steps
        acp_t = acp[ts]
        acp_prev = torch.where(torch.as_tensor(prev >= 0), acp[np.maximum(prev, 0)], final)
        sqrt_a, sqrt_b = acp_t.sqrt(), (1 - acp_t).sqrt()
        variance = (1 - acp_prev) / (1 - acp_t) * (1 - acp_t / acp_prev)
        std = self.eta * variance.sqrt()
        tables = _x0_from_alpha(sqrt_a, sqrt_b, self.prediction_type)
        if self.prediction_type == "epsilon":
            tables.update(eps_x=torch.zeros_like(sqrt_a), eps_m=torch.ones_like(sqrt_a))
        else:
            tables.update(eps_x=sqrt_b, eps_m=sqrt_a)
        tables.update(x0_prev=acp_prev.sqrt(), eps_prev=(1 - acp_prev - std**2).sqrt(), std=std)
        noise_steps = [self.eta > 0] * steps
        return RawSchedule(torch.from_numpy(ts), noise_steps, 1.0, None, *self._noised(acp_t), tables)

    def _step(self, m, i, x, t, noise, state):
        x0 = self._x0(m, i, x, t)
        eps = t["eps_x"][i] * x + t["eps_m"][i] * m
        prev = t["x0_prev"][i] * x0 + t["eps_prev"][i] * eps
        return prev if noise is None else prev + t["std"][i] * noise


# ---------------------------------------------------------------------------------------------- DDPM
class DDPM(_AlphaScheduler):
    _DEFAULTS = {"clip_sample": True, "clip_sample_range": 1.0, "variance_type": "fixed_small",
                 "timestep_spacing": "leading", "thresholding": False}

    def __init__(self, name, config, overrides, eta):
        super().__init__(name, config, overrides, eta)
        self.variance_type = _require(name, self.cfg, "variance_type",
                                      ("fixed_small", "fixed_small_log", "fixed_large"))

    def _build(self, steps, strength):
        ts = self._spaced(steps)
        acp = _f64(self.acp)
        acp_t = acp[ts]
        acp_prev = torch.cat([acp[ts[1:]], torch.ones(1, dtype=torch.float64)])  # the next table entry; 1 at the end
        beta_t = 1 - acp_t / acp_prev
        variance = ((1 - acp_prev) / (1 - acp_t) * beta_t).clamp(min=1e-20)
        std = beta_t.sqrt() if self.variance_type == "fixed_large" else variance.sqrt()
        tables = _x0_from_alpha(acp_t.sqrt(), (1 - acp_t).sqrt(), self.prediction_type)
        tables.update(c_x0=acp_prev.sqrt() * beta_t / (1 - acp_t),
                      c_x=(1 - beta_t).sqrt() * (1 - acp_prev) / (1 - acp_t), std=std)
        return RawSchedule(torch.from_numpy(ts), ts > 0, 1.0, None, *self._noised(acp_t), tables)

    def _step(self, m, i, x, t, noise, state):
        prev = t["c_x0"][i] * self._x0(m, i, x, t) + t["c_x"][i] * x
        return prev if noise is None else prev + t["std"][i] * noise


# ----------------------------------------------------------------------------------------------- LCM
class LCM(_AlphaScheduler):
    _DEFAULTS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                 "set_alpha_to_one": True, "timestep_spacing": "leading", "timestep_scaling": 10.0,
                 "thresholding": False}

    def start_index(self, steps: int, strength: float) -> int:
        super().start_index(steps, strength)  # same argument checks and strength=0 refusal
        return 0  # the strength already shaped the table (set_timesteps)

    def _build(self, steps, strength):
        original = int(self.cfg["original_inference_steps"])
        if original > self.num_train_timesteps:
            raise InvalidInputError(f"scheduler config original_inference_steps={original} exceeds "
                                    f"num_train_timesteps={self.num_train_timesteps}")
        k = self.num_train_timesteps // original
        origin = np.arange(1, int(original * strength) + 1) * k - 1
        if steps > original or len(origin) // steps < 1:
            raise InvalidInputError(f"steps={steps} is more than LCM allows here: at most "
                                    f"int(original_inference_steps * strength) = {len(origin)} (and {original})")
        origin = origin[::-1].copy()
        ts = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
        acp = _f64(self.acp)
        acp_t = acp[ts]
        acp_prev = acp[np.append(ts[1:], ts[-1])]  # the last step returns the denoised sample directly
        scaled = _f64(ts) * float(self.cfg["timestep_scaling"])
        sigma_data = 0.5
        tables = _x0_from_alpha(acp_t.sqrt(), (1 - acp_t).sqrt(), self.prediction_type)
        tables.update(c_skip=sigma_data**2 / (scaled**2 + sigma_data**2),
                      c_out=scaled / (scaled**2 + sigma_data**2) ** 0.5,
                      den_prev=acp_prev.sqrt(), noise_prev=(1 - acp_prev).sqrt())
        noise_steps = [j != steps - 1 for j in range(steps)]
        return RawSchedule(torch.from_numpy(ts.astype(np.int64)), noise_steps, 1.0, None, *self._noised(acp_t), tables)

    def _step(self, m, i, x, t, noise, state):
        denoised = t["c_out"][i] * self._x0(m, i, x, t) + t["c_skip"][i] * x
        return denoised if noise is None else t["den_prev"][i] * denoised + t["noise_prev"][i] * noise


# --------------------------------------------------------------------------------- Euler, Euler ancestral
class _SigmaScheduler(Scheduler):
    """Euler types: x = x0 + sigma * eps, float timesteps, model input scaled by 1/sqrt(sigma^2 + 1)."""

    def __init__(self, name, config, overrides, eta):
        super().__init__(name, config, overrides, eta)
        self.acp = _alphas_cumprod(name, self.cfg, zero_snr_floor=True)
        self.spacing = _require(name, self.cfg, "timestep_spacing", ("linspace", "leading", "trailing"))

    def _train_sigmas(self) -> np.ndarray:
        return (((1 - self.acp) / self.acp) ** 0.5).numpy()  # float32, indexed by training timestep

    def _timesteps(self, steps: int) -> np.ndarray:
        return _spaced_timesteps(self.spacing, steps, self.num_train_timesteps,
                                 int(self.cfg["steps_offset"])).astype(np.float32)

    def _finish(self, ts: np.ndarray, sigmas32: np.ndarray, noise_steps, extra: dict) -> RawSchedule:
        """sigmas32: float32 [n+1] ending with the final sigma."""
        sig = _f64(sigmas32)
        max_sigma = float(sigmas32.max())
        init = max_sigma if self.spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
        s = sig[:-1]
        tables = _x0_from_sigma(s, self.prediction_type)
        tables.update(sigma=s, **extra)
        return RawSchedule(torch.from_numpy(ts.astype(np.float32)), noise_steps, init, 1 / (s**2 + 1) ** 0.5,
                           torch.ones_like(s), s, tables)

    def _derivative(self, m, i, x, t) -> Tensor:
        x0 = t["x0_x"][i] * x + t["x0_m"][i] * m
        return (x - x0) / t["sigma"][i]


class Euler(_SigmaScheduler):
    _DEFAULTS = {"timestep_spacing": "linspace", "interpolation_type": "linear", "use_karras_sigmas": False,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
                 "timestep_type": "discrete", "final_sigmas_type": "zero"}

    def __init__(self, name, config, overrides, eta):
        super().__init__(name, config, overrides, eta)
        for key, allowed in (("interpolation_type", ("linear",)), ("timestep_type", ("discrete",)),
                             ("final_sigmas_type", ("zero", "sigma_min")), ("use_exponential_sigmas", (False,)),
                             ("use_beta_sigmas", (False,))):
            _require(name, self.cfg, key, allowed)

    def _build(self, steps, strength):
        ts = self._timesteps(steps)
        train = self._train_sigmas()
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if self.cfg["use_karras_sigmas"]:
            lo = self.cfg["sigma_min"] if self.cfg["sigma_min"] is not None else float(sigmas[-1])
            hi = self.cfg["sigma_max"] if self.cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = _karras(lo, hi, steps)
            ts = _sigma_to_t(sigmas, np.log(train))
        last = float(train[0]) if self.cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas32 = np.concatenate([sigmas, [last]]).astype(np.float32)
        dt = _f64(sigmas32[1:]) - _f64(sigmas32[:-1])
        return self._finish(ts, sigmas32, [False] * steps, {"dt": dt})

    def _step(self, m, i, x, t, noise, state):
        return x + self._derivative(m, i, x, t) * t["dt"][i]


class EulerAncestral(_SigmaScheduler):
    _DEFAULTS = {"timestep_spacing": "linspace"}

    def _build(self, steps, strength):
        ts = self._timesteps(steps)
        train = self._train_sigmas()
        sigmas32 = np.concatenate([np.interp(ts, np.arange(0, len(train)), train), [0.0]]).astype(np.float32)
        s_from, s_to = _f64(sigmas32[:-1]), _f64(sigmas32[1:])
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2).clamp(min=0) ** 0.5
        return self._finish(ts, sigmas32, [True] * steps, {"dt": s_down - s_from, "sigma_up": s_up})

    def _step(self, m, i, x, t, noise, state):
        return x + self._derivative(m, i, x, t) * t["dt"][i] + t["sigma_up"][i] * noise


# ------------------------------------------------------------------------------------ DPM-Solver++ 2M
class DPMSolverPP2M(Scheduler):
    """Multistep DPM-Solver++ (order 2, midpoint), with or without Karras sigmas."""

    _DEFAULTS = {"timestep_spacing": "linspace", "solver_order": 2, "algorithm_type": "dpmsolver++",
                 "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "sigma_min": None, "sigma_max": None,
                 "final_sigmas_type": "zero", "lambda_min_clipped": -float("inf"), "variance_type": None,
                 "thresholding": False}

    def __init__(self, name, config, overrides, eta):
        super().__init__(name, config, overrides, eta)
        for key, allowed in (("solver_order", (2,)), ("algorithm_type", ("dpmsolver++",)),
                             ("solver_type", ("midpoint",)), ("final_sigmas_type", ("zero", "sigma_min")),
                             ("variance_type", (None,)), ("use_exponential_sigmas", (False,)),
                             ("use_beta_sigmas", (False,)), ("use_lu_lambdas", (False,)),
                             ("use_flow_sigmas", (False,)),
                             ("timestep_spacing", ("linspace", "leading", "trailing"))):
            _require(name, self.cfg, key, allowed)
        self.acp = _alphas_cumprod(name, self.cfg, zero_snr_floor=True)

    def init_state(self, sample: Tensor) -> MultistepState:
        ctype = torch.promote_types(sample.dtype, torch.float32)
        return MultistepState(prev_x0=torch.zeros_like(sample, dtype=ctype),
                              has_prev=torch.zeros((), dtype=ctype, device=sample.device))

    def _timesteps(self, steps: int) -> np.ndarray:
        n_train, spacing = self.num_train_timesteps, self.cfg["timestep_spacing"]
        lambda_t = torch.log(self.acp.sqrt()) - torch.log((1 - self.acp).sqrt())
        clipped = int(torch.searchsorted(torch.flip(lambda_t, [0]), float(self.cfg["lambda_min_clipped"])))
        last = n_train - clipped
        if spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = last // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + int(self.cfg["steps_offset"])
        return np.arange(last, 0, -n_train / steps).round().astype(np.int64) - 1

    def _build(self, steps, strength):
        ts = self._timesteps(steps)
        train = (((1 - self.acp) / self.acp) ** 0.5).numpy()
        if self.cfg["use_karras_sigmas"]:
            lo = self.cfg["sigma_min"] if self.cfg["sigma_min"] is not None else float(train[0])
            hi = self.cfg["sigma_max"] if self.cfg["sigma_max"] is not None else float(train[-1])
            sigmas = _karras(lo, hi, steps)
            ts = _sigma_to_t(sigmas, np.log(train)).round().astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if ts.max() >= self.num_train_timesteps:
            raise InvalidInputError(f"steps={steps} with steps_offset={self.cfg['steps_offset']} runs past "
                                    f"num_train_timesteps={self.num_train_timesteps}; use fewer steps")
        last = float(train[0]) if self.cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sig = _f64(np.concatenate([sigmas, [last]]).astype(np.float32))  # [n+1]
        alpha = 1 / (sig**2 + 1) ** 0.5
        sigma = sig * alpha
        lam = torch.log(alpha) - torch.log(sigma)  # +inf at a zero final sigma
        s0 = torch.arange(steps)
        h = lam[s0 + 1] - lam[s0]
        a_next, em1 = alpha[s0 + 1], torch.expm1(-h)
        # second order needs the previous step; diffusers falls back to first order at the first executed
        # step (has_prev = 0), and at the last one under lower_order_final / euler_at_final / zero final sigma
        r0 = (lam[s0] - lam[s0 - 1]) / h
        first_order = s0 == 0
        if self.cfg["euler_at_final"] or (self.cfg["lower_order_final"] and steps < 15) \
                or self.cfg["final_sigmas_type"] == "zero":
            first_order = first_order | (s0 == steps - 1)
        c_d1 = torch.where(first_order, torch.zeros(()), -0.5 * a_next * em1 / torch.where(first_order, 1.0, r0))
        if self.prediction_type == "epsilon":
            x0 = {"x0_x": 1 / alpha[:-1], "x0_m": -sigma[:-1] / alpha[:-1]}
        else:
            x0 = {"x0_x": alpha[:-1], "x0_m": -sigma[:-1]}
        tables = dict(x0, c_x=sigma[1:] / sigma[:-1], c_x0=-a_next * em1, c_d1=c_d1)
        return RawSchedule(torch.from_numpy(ts), [False] * steps, 1.0, None, alpha[:-1], sigma[:-1], tables)

    def _step(self, m, i, x, t, noise, state):
        if state is None:
            raise InvalidInputError("state must be the object init_state() returned, for the dpmpp_2m schedulers")
        x0 = t["x0_x"][i] * x + t["x0_m"][i] * m
        prev = t["c_x"][i] * x + t["c_x0"][i] * x0 + (state.has_prev * t["c_d1"][i]) * (x0 - state.prev_x0)
        state.prev_x0.copy_(x0)
        state.has_prev.fill_(1.0)
        return prev


_SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIM, {}),
    "ddpm": (DDPM, {}),
    "euler": (Euler, {}),
    "euler_a": (EulerAncestral, {}),
    "dpmpp_2m": (DPMSolverPP2M, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverPP2M, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                        "use_karras_sigmas": True}),
    "lcm": (LCM, {}),
}
