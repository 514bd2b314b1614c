"""sdrt.schedulers and sdrt.guidance against diffusers' schedulers and pipelines.

Every trajectory runs in float64 with a deterministic fake model (a smooth function of the sample and the
timestep) driving both sdrt and diffusers; stochastic steps draw from two CPU generators with the same
seed, sdrt where `Schedule.noise_steps` says, diffusers inside its own `step(..., generator=g)`, so the draw order is
tested too. Tolerance: every intermediate sample within 1e-5 of diffusers', relative to the sample's max
magnitude (the remaining ~1e-7 difference is diffusers' float32 coefficient tables and float32 casts).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline)

from sdrt.errors import InvalidInputError  # noqa: E402
from sdrt.guidance import combine, uses_cfg  # noqa: E402
from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler, normalize_name  # noqa: E402

RTOL = 1e-5
# diffusers' own np.array(tensor) calls under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "skip_prk_steps": True, "trained_betas": None}
LINEAR = {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "num_train_timesteps": 1000, "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False,
          "timestep_spacing": "trailing"}
BASES = {"sd15": SD15, "linear": LINEAR}

# (sdrt name, eta, diffusers class, extra from_config kwargs)
CASES = {
    "ddim": ("ddim", 0.0, DDIMScheduler, {}),
    "ddim_eta": ("ddim", 0.6, DDIMScheduler, {}),
    "ddpm": ("ddpm", 0.0, DDPMScheduler, {}),
    "euler": ("euler", 0.0, EulerDiscreteScheduler, {}),
    "euler_a": ("euler_a", 0.0, EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": ("dpmpp_2m", 0.0, DPMSolverMultistepScheduler,
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("dpmpp_2m_karras", 0.0, DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lcm": ("lcm", 0.0, LCMScheduler, {}),
}

SHAPE = (2, 4, 4, 4)
_PATTERN = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    tt = float(t)
    return 0.9 * torch.tanh(x) * math.cos(tt / 300) + 0.1 * _PATTERN * math.sin(tt / 97 + 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run_both(case: str, config: dict, steps: int, strength: float = 1.0):
    """Run sdrt and diffusers side by side; assert equal timesteps and per-step closeness."""
    name, eta, cls, kwargs = CASES[case]
    ours = make_scheduler(name, config, eta)
    sch = ours.set_timesteps(steps, dtype=torch.float64, strength=strength)
    ref = cls.from_config(config, **kwargs)
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    if strength == 1.0:
        ref.set_timesteps(steps)
        ref_timesteps = ref.timesteps
        start = ours.start_index(steps, strength)
        x_ours, x_ref = noise * sch.init_noise_sigma, noise * ref.init_noise_sigma
    else:
        if name == "lcm":  # diffusers' LCM img2img pipeline: the strength shapes the table itself
            ref.set_timesteps(steps, strength=strength)
            ref_timesteps = ref.timesteps
        else:
            ref.set_timesteps(steps)
            ref_timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=ref), steps, strength, "cpu")
        start = ours.start_index(steps, strength)
        x_ours = ours.add_noise(clean, noise, start, sch)
        x_ref = ref.add_noise(clean, noise, ref_timesteps[:1])
        assert rel_err(x_ours, x_ref) <= RTOL

    assert sch.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(sch.timesteps[start:], ref_timesteps)
    assert math.isclose(sch.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)

    g_ours, g_ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    state = ours.init_state(x_ours)
    step_kwargs = {"eta": eta} if cls is DDIMScheduler else {}
    for k, t in enumerate(ref_timesteps):
        i = start + k
        m_ours = fake_model(ours.scale_model_input(x_ours, i, sch), sch.timesteps[i])
        m_ref = fake_model(ref.scale_model_input(x_ref, t), t)
        draw = torch.randn(SHAPE, generator=g_ours, dtype=torch.float64) if sch.noise_steps[i] else None
        x_ours = ours.step(m_ours, i, x_ours, sch, noise=draw, state=state)
        x_ref = ref.step(m_ref, t, x_ref, generator=g_ref, **step_kwargs).prev_sample
        assert x_ours.dtype == torch.float64
        err = rel_err(x_ours, x_ref)
        assert err <= RTOL, f"step {i} (t={int(t)}): relative error {err:.2e}"
    # both generators consumed the same number of draws
    assert torch.equal(torch.randn(3, generator=g_ours), torch.randn(3, generator=g_ref))


# ------------------------------------------------------------------------------- full trajectories
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case, base, prediction_type, spacing, steps):
    config = dict(BASES[base], prediction_type=prediction_type, timestep_spacing=spacing)
    run_both(case, config, steps)


# config flags beyond the basic grid: (case, config changes, diffusers-only kwargs)
EXTRA = [
    ("ddim", {"clip_sample": True}),
    ("ddim_eta", {"clip_sample": True, "clip_sample_range": 1.5}),
    ("ddpm", {"clip_sample": True}),
    ("ddpm", {"variance_type": "fixed_large"}),
    ("ddpm", {"variance_type": "fixed_small_log"}),
    ("lcm", {"clip_sample": True, "timestep_scaling": 5.0, "original_inference_steps": 40}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}),
] + [(case, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
     for case in ("ddim", "ddim_eta", "ddpm", "euler", "euler_a", "dpmpp_2m", "lcm")]


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("case,changes", EXTRA, ids=[f"{c}-{'-'.join(ch)}" for c, ch in EXTRA])
def test_matches_diffusers_config_flags(case, changes, steps):
    run_both(case, dict(SD15, **changes), steps)


def test_use_default_values_are_dropped_like_diffusers():
    # a config saved by DDIMScheduler whose timestep_spacing was only DDIM's default: Euler must use its own
    config = dict(SD15, _class_name="DDIMScheduler", timestep_spacing="leading",
                  _use_default_values=["timestep_spacing"])
    run_both("euler", config, 10)
    assert make_scheduler("euler", config).set_timesteps(10).timesteps[0] == 999.0


# --------------------------------------------------------------------------------------- img2img
@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("case", list(CASES))
def test_img2img_matches_diffusers(case, steps, strength):
    if case == "lcm" and int(50 * strength) < steps:  # fewer distilled timesteps left than steps: both refuse
        with pytest.raises(ValueError):
            LCMScheduler.from_config(SD15).set_timesteps(steps, strength=strength)
        with pytest.raises(InvalidInputError, match="steps"):
            make_scheduler("lcm", SD15).set_timesteps(steps, strength=strength)
        return
    run_both(case, dict(SD15, timestep_spacing="leading"), steps, strength)


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("case", [c for c in CASES if c != "lcm"])
def test_start_index_matches_img2img_get_timesteps(case, strength, steps):
    name, eta, cls, kwargs = CASES[case]
    ours = make_scheduler(name, SD15, eta)
    ref = cls.from_config(SD15, **kwargs)
    ref.set_timesteps(steps)
    if int(steps * strength) == 0:
        with pytest.raises(InvalidInputError, match="strength"):
            ours.start_index(steps, strength)
        return
    ref_timesteps, n_run = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref), steps, strength, "cpu")
    start = ours.start_index(steps, strength)
    assert torch.equal(ours.set_timesteps(steps).timesteps[start:], ref_timesteps)
    assert steps - start == n_run


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_strength_zero_is_a_clear_error(name):
    # documented choice: a strength that leaves no denoising step is refused, not a silent no-op
    sched = make_scheduler(name, SD15)
    for strength, steps in [(0.0, 10), (0.05, 10)]:
        with pytest.raises(InvalidInputError, match="strength"):
            sched.start_index(steps, strength)


def test_lcm_strength_table_and_start():
    sched = make_scheduler("lcm", SD15)
    assert sched.start_index(4, 0.5) == 0
    ref = LCMScheduler.from_config(SD15)
    ref.set_timesteps(4, strength=0.5)
    assert torch.equal(sched.set_timesteps(4, strength=0.5).timesteps, ref.timesteps)
    with pytest.raises(InvalidInputError, match="steps"):
        sched.set_timesteps(30, strength=0.5)  # only 25 distilled timesteps remain


# ------------------------------------------------------------------------------ stateless contract
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_steps_are_stateless_and_repeatable(name):
    sched = make_scheduler(name, SD15, eta=0.5)
    sch = sched.set_timesteps(10)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    before = dict(vars(sched))

    def loop():
        x, state, g = x0 * sch.init_noise_sigma, sched.init_state(x0), torch.Generator().manual_seed(5)
        for i in range(len(sch.timesteps)):
            m = fake_model(sched.scale_model_input(x, i, sch), sch.timesteps[i]).float()
            noise = torch.randn(SHAPE, generator=g) if sch.noise_steps[i] else None
            x = sched.step(m, i, x, sch, noise=noise, state=state)
        return x

    first, second = loop(), loop()
    assert torch.equal(first, second)
    assert first.dtype == torch.float32 and torch.isfinite(first).all()
    assert vars(sched).keys() == before.keys() and all(vars(sched)[k] is v for k, v in before.items())


def test_half_precision_sample_is_computed_in_float32_and_returned_in_half():
    sched = make_scheduler("euler", SD15)
    sch = sched.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sch.init_noise_sigma
    m = fake_model(x.double(), sch.timesteps[0]).float()
    out16 = sched.step(m.half(), 0, x.half(), sch)
    out32 = sched.step(m.half().float(), 0, x.half().float(), sch)
    assert out16.dtype == torch.float16
    assert torch.equal(out16, out32.half())


def test_noise_argument_must_follow_noise_steps():
    sched = make_scheduler("euler_a", SD15)
    sch = sched.set_timesteps(5)
    x = torch.zeros(SHAPE)
    with pytest.raises(InvalidInputError, match="noise"):
        sched.step(x, 0, x, sch)
    ddim = make_scheduler("ddim", SD15)
    with pytest.raises(InvalidInputError, match="noise"):
        ddim.step(x, 0, x, ddim.set_timesteps(5), noise=x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_whole_loop_captures_in_a_cuda_graph():
    for name in SCHEDULER_NAMES:
        sched = make_scheduler(name, SD15, eta=0.5)
        sch = sched.set_timesteps(10, device="cuda")
        x0 = torch.randn(SHAPE, device="cuda")
        noises = [torch.randn(SHAPE, device="cuda") for _ in range(10)]

        def loop(x, state):
            for i in range(10):
                m = torch.tanh(sched.scale_model_input(x, i, sch)) * 0.5
                x = sched.step(m, i, x, sch, noise=noises[i] if sch.noise_steps[i] else None, state=state)
            return x

        eager = loop(x0.clone(), sched.init_state(x0))
        static_x, state = x0.clone(), sched.init_state(x0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture
            loop(static_x.clone(), sched.init_state(x0))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = loop(static_x, state)
        graph.replay()
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------ names and configs
@pytest.mark.parametrize("cls_name,config_changes,expected", [
    ("DDIMScheduler", {}, "ddim"), ("PNDMScheduler", {}, "ddim"), ("DDPMScheduler", {}, "ddpm"),
    ("EulerDiscreteScheduler", {}, "euler"), ("EulerAncestralDiscreteScheduler", {}, "euler_a"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m_karras"),
    ("LCMScheduler", {}, "lcm"), ("UniPCMultistepScheduler", {}, "ddim"),
])
def test_name_from_config_class(cls_name, config_changes, expected):
    assert make_scheduler(None, dict(SD15, _class_name=cls_name, **config_changes)).name == expected


@pytest.mark.parametrize("alias,expected", [
    ("DDIM", "ddim"), ("Euler-A", "euler_a"), ("euler_ancestral", "euler_a"), ("DPM++ 2M", "dpmpp_2m"),
    ("dpm++_2m_karras", "dpmpp_2m_karras"), (" lcm ", "lcm")])
def test_aliases(alias, expected):
    assert normalize_name(alias) == expected
    assert make_scheduler(alias, SD15).name == expected


def test_name_override_wins_over_config_class():
    config = dict(SD15, _class_name="EulerDiscreteScheduler")
    assert make_scheduler("dpmpp_2m_karras", config).name == "dpmpp_2m_karras"


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("steps", [0, -3, 1.5, True, 1001, None])
def test_bad_steps(steps):
    with pytest.raises(InvalidInputError, match="steps"):
        make_scheduler("ddim", SD15).set_timesteps(steps)
    with pytest.raises(InvalidInputError, match="steps"):
        make_scheduler("euler", SD15).start_index(steps, 0.5)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf"), "1"])
def test_bad_eta(eta):
    with pytest.raises(InvalidInputError, match="eta"):
        make_scheduler("ddim", SD15, eta=eta)


@pytest.mark.parametrize("name", ["plms", "heun", "", 3])
def test_unknown_scheduler_lists_choices(name):
    with pytest.raises(InvalidInputError, match="scheduler") as err:
        make_scheduler(name, SD15)
    assert all(n in str(err.value) for n in SCHEDULER_NAMES)


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan"), "0.5"])
def test_bad_strength(strength):
    sched = make_scheduler("ddim", SD15)
    with pytest.raises(InvalidInputError, match="strength"):
        sched.start_index(10, strength)
    with pytest.raises(InvalidInputError, match="strength"):
        sched.set_timesteps(10, strength=strength)


@pytest.mark.parametrize("name,key,value", [
    ("ddim", "beta_schedule", "squaredcos_cap_v2"), ("euler", "prediction_type", "sample"),
    ("ddpm", "timestep_spacing", "random"), ("ddim", "thresholding", True), ("ddpm", "variance_type", "learned"),
    ("euler", "interpolation_type", "log_linear"), ("euler", "timestep_type", "continuous"),
    ("dpmpp_2m", "solver_type", "heun"), ("dpmpp_2m_karras", "use_lu_lambdas", True),
])
def test_unsupported_config_values_are_refused(name, key, value):
    with pytest.raises(InvalidInputError, match=key) as err:
        make_scheduler(name, dict(SD15, **{key: value})).set_timesteps(10)
    assert "supported" in str(err.value)


def test_config_must_be_a_mapping():
    with pytest.raises(InvalidInputError, match="config"):
        make_scheduler("ddim", None)


# ---------------------------------------------------------------------------------------- guidance
def test_cfg_combine_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    out = combine(torch.cat([uncond, cond]), 7.5)
    torch.testing.assert_close(out, uncond + 7.5 * (cond - uncond), rtol=0, atol=0)


def test_cfg_combine_takes_a_tensor_scale_with_the_same_arithmetic():
    pred = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(combine(pred, torch.tensor(7.5)), combine(pred, 7.5))


def test_cfg_only_above_scale_one():
    for scale in (1.0, 0.5, 0):
        assert not uses_cfg(scale)
    assert uses_cfg(1.01)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "7", None])
def test_bad_guidance_scale(scale):
    with pytest.raises(InvalidInputError, match="guidance_scale"):
        uses_cfg(scale)


def test_combine_refuses_odd_batch():
    with pytest.raises(InvalidInputError, match="noise_pred"):
        combine(torch.zeros(3, 4, 2, 2), 7.5)
