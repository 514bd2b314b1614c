"""CUDA graphs: capture a static-shape call once, then replay it with new inputs copied into static buffers.

- `CapturedCall`: `fn(*static_inputs)` captured in a `torch.cuda.CUDAGraph` with its own private memory
  pool, after a warm-up on a side stream (the standard recipe: Triton compilation and autotuning, cuBLAS
  workspaces and lazy initialisation happen there, never inside the capture). A call copies its inputs
  into the static buffers, replays, and returns a clone of the static output (the next replay overwrites
  it). With `capture=False` the same `fn` runs eagerly on the same static buffers: that is how the CPU
  tests prove the graphed runner computes exactly what the eager loop computes.
- `GraphCache`: least-recently-used captures, bounded by an entry count and by the bytes they hold.
- `DenoiseGraphs`: the whole denoising loop (U-Net on the CFG batch, guidance, scheduler step) as one
  graph per `DenoiseKey`; a drop-in for `sdrt.denoise.denoise`.
- `ShapeGraphs`: any tensor function graphed per input shapes (the text encoder, the VAE decoder).

What a replay cannot see is in the key: the shape, dtype and device of every static input (so a
context of another length or dtype is a new capture, never a refused or silently cast copy) and every
Python value baked in at capture (the scheduler, its eta and its whole resolved config - prediction type,
clip range, ... -, the schedule's non-tensor fields, which steps take noise, the start index, guidance
on/off, the inpainting mode, and which U-Net object runs). Every tensor the loop reads (latents, context,
guidance scale, step noise, the schedule's tables, the inpainting condition and blend, the U-Net's added
inputs - SDXL's text_embeds and time_ids, by name, shape and dtype, the ControlNets' control images) is a
static input copied on each call, so a new seed, prompt, guidance scale, strength, SDXL size/crop/aesthetic id
or control image never recaptures. ControlNets put in the key which ones run, their scale at every step
(so a new controlnet_conditioning_scale or control_guidance_start/end recaptures) and guess mode.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from sdrt.control import ControlResiduals
from sdrt.denoise import LatentBlend, check_added, denoise
from sdrt.errors import InvalidInputError
from sdrt.guidance import per_sample_scale, uses_cfg
from sdrt.schedulers import Schedule, Scheduler

log = logging.getLogger(__name__)

Output = Union[Tensor, tuple[Tensor, ...]]

# Default budget for the captures of one cache on CUDA: this share of the device's memory.
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_MAX_ENTRIES = 4


def _tensor_bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _as_tuple(out: Output) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


class CapturedCall:
    """`fn` over static copies of `example_inputs`, captured in a CUDA graph when `capture` is True.

    `nbytes`: the static inputs plus, when captured, the memory the capture reserved for its private
    pool (what the graph keeps alive: activations, workspaces, the static output)."""

    def __init__(self, fn: Callable[..., Output], example_inputs: Sequence[Tensor], *, capture: bool,
                 warmup_runs: int = 1):
        self.fn = fn
        # Normal tensors even when created under inference_mode: an inference tensor refuses the in-place
        # copy of a later call made outside inference_mode (normal tensors accept copies in both modes).
        with torch.inference_mode(False):
            self.static_inputs = [t.detach().clone() for t in example_inputs]
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.static_output: Optional[Output] = None
        self.nbytes = _tensor_bytes(self.static_inputs)
        if capture:
            self._capture(warmup_runs)

    def _capture(self, warmup_runs: int) -> None:
        device = self.static_inputs[0].device
        if device.type != "cuda":
            raise InvalidInputError(f"CUDA graphs need CUDA tensors, got inputs on {device}")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                self.fn(*self.static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_output = self.fn(*self.static_inputs)
        torch.cuda.synchronize(device)
        grown = max(torch.cuda.memory_reserved(device) - reserved, torch.cuda.memory_allocated(device) - allocated)
        self.graph = graph
        self.nbytes += max(grown, _tensor_bytes(_as_tuple(self.static_output)))

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: Tensor) -> Output:
        if len(inputs) != len(self.static_inputs):
            raise InvalidInputError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, x in zip(self.static_inputs, inputs):
            if static.shape != x.shape or static.dtype != x.dtype or static.device != x.device:
                # copy_ would cast or move silently: the capture ran on the static buffers' dtype and device
                raise InvalidInputError(f"a captured call takes shape {list(static.shape)} {static.dtype} on "
                                        f"{static.device}, got shape {list(x.shape)} {x.dtype} on {x.device}")
            static.copy_(x)
        if self.graph is None:
            out = self.fn(*self.static_inputs)
        else:
            self.graph.replay()
            out = self.static_output
        cloned = tuple(t.clone() for t in _as_tuple(out))
        return cloned if isinstance(out, tuple) else cloned[0]


class GraphCache:
    """Captures by key, least recently used first out. Bounded by `max_entries` and by `max_bytes` (the
    sum of the entries' `nbytes`; None = no byte bound); the newest entry always stays, even alone over budget.
    `captures` counts the entries ever created (a test's and the bench's measure of recapturing)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: Optional[int] = None):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidInputError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise InvalidInputError(f"max_bytes must be None or an integer >= 0, got {max_bytes!r}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.captures = 0

    @classmethod
    def for_device(cls, device: torch.device, max_entries: int = DEFAULT_MAX_ENTRIES,
                   memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> "GraphCache":
        """A cache whose byte budget is `memory_fraction` of the CUDA device's memory (none on a CPU)."""
        device = torch.device(device)
        budget = None
        if device.type == "cuda":
            budget = int(torch.cuda.get_device_properties(device).total_memory * memory_fraction)
        return cls(max_entries, budget)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        return list(self._entries)

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def get_or_create(self, key: Hashable, create: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = create()
        self.captures += 1
        self._entries[key] = entry
        self._evict()
        return entry

    def _evict(self) -> None:
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or
                                          (self.max_bytes is not None and self.total_bytes > self.max_bytes)):
            key, entry = self._entries.popitem(last=False)
            log.info("graph cache: evicted %s (%.1f MB)", key, entry.nbytes / 2**20)

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True)
class DenoiseKey:
    """What a denoising-loop capture bakes in (see the module docstring)."""

    inputs: tuple            # (name, shape, dtype, device) of every static input, in the order passed
    scheduler: str
    eta: float
    scheduler_config: tuple  # the scheduler's resolved config as sorted (key, value) pairs
    schedule: tuple          # the schedule's non-tensor fields: init_noise_sigma, noise_steps, table names
    cfg: bool
    start: int               # first step (img2img / inpainting strength)
    condition: bool          # 9-channel inpainting: [mask, masked-image latents] appended to the U-Net input
    blend: bool              # 4-channel inpainting resets the unmasked latents each step
    unet: int                # id() of the U-Net callable; the capture holds it, so the id is not reused
    control: tuple = ()      # ControlNets: `sdrt.control.ControlResiduals.key` (their images are static inputs)

    def describe(self) -> str:
        latents = self.inputs[0][1]
        return (f"latents {list(latents)}, context {list(self.inputs[1][1])} {self.inputs[1][2]}, "
                f"{self.scheduler} from step {self.start}, cfg {self.cfg}")


def _frozen(value: Any) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _signature(named: Sequence[tuple[str, Tensor]]) -> tuple:
    return tuple((name, tuple(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)) for name, t in named)


def _schedule_tensors(schedule: Schedule) -> list[Tensor]:
    scale = [] if schedule.input_scale is None else [schedule.input_scale]
    return [schedule.timesteps, *scale, schedule.noised_x0, schedule.noised_noise,
            *(schedule.tables[k] for k in sorted(schedule.tables))]


def _schedule_from(template: Schedule, tensors: Sequence[Tensor]) -> Schedule:
    """`template` with its tensors replaced by `tensors` (in `_schedule_tensors` order)."""
    it = iter(tensors)
    timesteps = next(it)
    scale = None if template.input_scale is None else next(it)
    noised_x0, noised_noise = next(it), next(it)
    tables = {k: next(it) for k in sorted(template.tables)}
    return dataclasses.replace(template, timesteps=timesteps, input_scale=scale, noised_x0=noised_x0,
                               noised_noise=noised_noise, tables=tables)


def _static_inputs(latents: Tensor, context: Tensor, guidance: Tensor, step_noise: Sequence[Optional[Tensor]],
                   schedule: Schedule, condition: Optional[Tensor], blend: Optional[LatentBlend],
                   added: Mapping[str, Tensor], control: Optional[ControlResiduals] = None) -> list:
    """(name, tensor) of every static input of the loop, in the order the loop function takes them."""
    named = [("latents", latents), ("context", context), ("guidance", guidance),
             *((f"noise[{i}]", n) for i, n in enumerate(step_noise) if n is not None),
             *((f"schedule[{j}]", t) for j, t in enumerate(_schedule_tensors(schedule)))]
    if condition is not None:
        named.append(("condition", condition))
    if blend is not None:
        named += [("blend.mask", blend.mask), ("blend.image_latents", blend.image_latents), ("blend.noise", blend.noise)]
    named += [(f"added.{name}", added[name]) for name in sorted(added)]
    if control is not None:
        named += [(f"control.image[{k}]", image) for k, image in enumerate(control.images)]
    return named


class DenoiseGraphs:
    """`sdrt.denoise.denoise` with the loop captured once per DenoiseKey and replayed after.

    `on_step` cannot run inside a graph: it is called for every step after the replay."""

    def __init__(self, cache: GraphCache, capture: bool = True):
        self.cache, self.capture = cache, capture

    def key(self, unet: Callable, scheduler: Scheduler, schedule: Schedule, latents: Tensor, context: Tensor,
            guidance_scale: float, start: int, step_noise: Sequence[Optional[Tensor]], *,
            condition: Optional[Tensor] = None, blend: Optional[LatentBlend] = None,
            added: Optional[Mapping[str, Tensor]] = None, control: Optional[ControlResiduals] = None) -> DenoiseKey:
        """The capture key of a call with these arguments (the same as `__call__`'s)."""
        guidance = per_sample_scale([float(guidance_scale)] * latents.shape[0], latents.device)
        named = _static_inputs(latents, context, guidance, step_noise, schedule, condition, blend,
                               check_added(added, context), control)
        return self._key(unet, scheduler, schedule, named, uses_cfg(guidance_scale), start, condition, blend,
                         control)

    @staticmethod
    def _key(unet, scheduler: Scheduler, schedule: Schedule, named: Sequence[tuple[str, Tensor]], cfg: bool,
             start: int, condition: Optional[Tensor], blend: Optional[LatentBlend],
             control: Optional[ControlResiduals] = None) -> DenoiseKey:
        return DenoiseKey(inputs=_signature(named), scheduler=scheduler.name, eta=scheduler.eta,
                          scheduler_config=_frozen(scheduler.cfg),
                          schedule=(schedule.init_noise_sigma, tuple(schedule.noise_steps),
                                    schedule.input_scale is not None, tuple(sorted(schedule.tables))),
                          cfg=cfg, start=start, condition=condition is not None, blend=blend is not None,
                          unet=id(unet), control=() if control is None else control.key())

    def __call__(self, unet: Callable, scheduler: Scheduler, schedule: Schedule, latents: Tensor, context: Tensor,
                 guidance_scale: Union[float, Sequence[float]], start: int, step_noise: Sequence[Optional[Tensor]],
                 *, condition: Optional[Tensor] = None, blend: Optional[LatentBlend] = None,
                 on_step: Optional[Callable[[int], None]] = None,
                 added: Optional[Mapping[str, Tensor]] = None, control: Optional[ControlResiduals] = None) -> Tensor:
        cfg = uses_cfg(guidance_scale)
        noise_at = [i for i, n in enumerate(step_noise) if n is not None]
        # always one scale per sample ([B, 1, 1, 1]): a scalar or a list call replays the same capture
        scales = guidance_scale if isinstance(guidance_scale, (list, tuple)) else [guidance_scale] * latents.shape[0]
        if len(scales) != latents.shape[0]:
            raise InvalidInputError(f"a guidance_scale list needs one scale per sample ({latents.shape[0]}), "
                                    f"got {len(scales)}")
        guidance = per_sample_scale(scales, latents.device)
        sched_tensors = _schedule_tensors(schedule)
        added = check_added(added, context)
        added_names = sorted(added)
        named = _static_inputs(latents, context, guidance, step_noise, schedule, condition, blend, added, control)
        key = self._key(unet, scheduler, schedule, named, cfg, start, condition, blend, control)
        inputs = [t for _, t in named]
        n_steps = len(step_noise)

        def loop(latents_s: Tensor, context_s: Tensor, guidance_s: Tensor, *rest: Tensor) -> Tensor:
            noise_s, rest = rest[:len(noise_at)], rest[len(noise_at):]
            sched_s, extra_s = rest[:len(sched_tensors)], list(rest[len(sched_tensors):])
            noise_list: list[Optional[Tensor]] = [None] * n_steps
            for i, n in zip(noise_at, noise_s):
                noise_list[i] = n
            condition_s = extra_s.pop(0) if condition is not None else None
            blend_s = LatentBlend(*(extra_s.pop(0) for _ in range(3))) if blend is not None else None
            added_s = dict(zip(added_names, extra_s[:len(added_names)], strict=True))
            control_s = None if control is None else control.with_images(extra_s[len(added_names):])
            return denoise(unet, scheduler, _schedule_from(schedule, sched_s), latents_s, context_s, guidance_s,
                           start, noise_list, condition=condition_s, blend=blend_s, cfg=cfg, added=added_s,
                           control=control_s)

        entry = self.cache.get_or_create(key, lambda: self._create(loop, inputs, key))
        out = entry(*inputs)
        if on_step is not None:
            for i in range(start, len(schedule.timesteps)):
                on_step(i)
        return out

    def _create(self, loop: Callable[..., Tensor], inputs: list[Tensor], key: DenoiseKey) -> CapturedCall:
        log.info("capturing the denoising loop for %s", key.describe())
        return _capture_or_retry(self.cache, lambda: CapturedCall(loop, inputs, capture=self.capture))


class ShapeGraphs:
    """`fn(*tensors)` captured once per input signature (shapes, dtypes, device) in `cache`."""

    def __init__(self, fn: Callable[..., Output], cache: GraphCache, capture: bool = True, name: str = "call"):
        self.fn, self.cache, self.capture, self.name = fn, cache, capture, name

    def __call__(self, *inputs: Tensor) -> Output:
        key = (self.name, *((tuple(t.shape), t.dtype, t.device) for t in inputs))
        entry = self.cache.get_or_create(
            key, lambda: _capture_or_retry(self.cache, lambda: CapturedCall(self.fn, inputs, capture=self.capture)))
        return entry(*inputs)


def _capture_or_retry(cache: GraphCache, make: Callable[[], CapturedCall]) -> CapturedCall:
    """A capture that runs out of memory empties the cache (and torch's) and tries once more."""
    try:
        return make()
    except torch.cuda.OutOfMemoryError:
        log.warning("out of memory while capturing a CUDA graph: dropping %d cached graphs and retrying", len(cache))
        cache.clear()
        torch.cuda.empty_cache()
        return make()
