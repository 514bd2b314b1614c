"""SDXL variants (sdrt.sdxl_variants): Turbo's and Lightning's recipes run as diffusers runs them (tiny random SDXL,
CPU float32; tolerances as the issue's pipeline parity: final latents max abs <= 1e-3, np images <= 2/255), and
the variants sdrt cannot run are refused by name in one line: folders whose configs only are written here (the
refusal comes before any weight is read), and single files written from the tiny folder with the marker or
shape that says what they are."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdrt
from sdxl_factories import save_sdxl
from test_sdxl_single_file import _original_layout

LATENT_TOL = 1e-3
IMAGE_TOL = 2 / 255
# stabilityai/sdxl-turbo's scheduler_config.json
TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
                   "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                   "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                   "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False}
# playgroundai/playground-v2.5-1024px-aesthetic's scheduler and VAE scaling
PLAYGROUND_SCHEDULER = {"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                        "final_sigmas_type": "zero", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                        "rho": 7.0, "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002, "solver_order": 2,
                        "solver_type": "midpoint"}
PLAYGROUND_VAE = {"latents_mean": [-1.6574, 1.886, -1.383, 2.5155], "latents_std": [8.4927, 5.9022, 6.5498, 5.2299],
                  "scaling_factor": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the tiny SDXL folder, its diffusers pipeline)."""
    root = tmp_path_factory.mktemp("sdxl-variants")
    return root / "base", save_sdxl(root / "base")


def _compare(ours, reference, steps, guidance, **kwargs):
    theirs = {output: reference("a red cube", num_inference_steps=steps, guidance_scale=guidance, output_type=output,
                                generator=torch.Generator("cpu").manual_seed(3)).images for output in ("latent", "np")}
    result = ours("a red cube", steps=steps, guidance_scale=guidance, seed=3, output="np", **kwargs)
    assert (result.latents - theirs["latent"]).abs().max().item() <= LATENT_TOL
    assert np.abs(result.images - theirs["np"]).max() <= IMAGE_TOL


def test_turbo_runs_with_its_own_scheduler_at_guidance_zero(tiny, tmp_path):
    import diffusers
    folder, reference = tiny
    turbo = shutil.copytree(folder, tmp_path / "turbo")
    (turbo / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    pipe = sdrt.load(turbo, device="cpu", dtype="float32")
    reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER)
    for steps in (1, 4):
        _compare(pipe, reference, steps, 0.0, scheduler=None)


def test_lightning_recipe_trailing_euler_at_guidance_zero(tiny):
    import diffusers
    folder, reference = tiny
    pipe = sdrt.load(folder, device="cpu", dtype="float32")
    pipe.scheduler_config["timestep_spacing"] = "trailing"
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config,
                                                                        timestep_spacing="trailing")
    _compare(pipe, reference, 4, 0.0, scheduler="euler")


def _configs_only(folder, target, **changes):
    """A copy of `folder`'s JSON configs alone (no weights), each updated by changes[component]."""
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        raw = json.loads((folder / name).read_text())
        raw.update(changes.get(name.split("/")[0].removesuffix(".json"), {}))
        (target / name).write_text(json.dumps(raw))
    return target


REFUSED_FOLDERS = {
    "playground-v2.5 scheduler": ({"scheduler": PLAYGROUND_SCHEDULER}, "EDM .*Playground v2.5.*EDMDPMSolver"),
    "edm euler": ({"scheduler": {"_class_name": "EDMEulerScheduler"}}, "EDM .*scheduler EDMEulerScheduler"),
    "continuous timesteps": ({"scheduler": {"timestep_type": "continuous"}}, "EDM .*timestep_type='continuous'"),
    "playground-v2.5 vae": ({"vae": PLAYGROUND_VAE}, "Playground v2.5-style VAE scaling .*latents_mean"),
    "instruct-pix2pix unet": ({"unet": {"in_channels": 8}}, "InstructPix2Pix.* 8-channel U-Net"),
    "instruct-pix2pix pipeline": ({"model_index": {"_class_name": "StableDiffusionXLInstructPix2PixPipeline"}},
                                  r"SDXL InstructPix2Pix \(StableDiffusionXLInstructPix2PixPipeline\)"),
    "ssd-1b unet": ({"unet": {"transformer_layers_per_block": [1, [2, 1]],
                              "reverse_transformer_layers_per_block": [[1, 2, 2], 1]}}, "SSD-1B, Segmind Vega"),
    "mid block without attention": ({"unet": {"mid_block_type": None}}, "SSD-1B.*mid_block_type=None"),
}


@pytest.mark.parametrize("variant", list(REFUSED_FOLDERS))
def test_unsupported_folder_variants_are_refused_by_name(tiny, tmp_path, variant):
    changes, message = REFUSED_FOLDERS[variant]
    folder = _configs_only(tiny[0], tmp_path / "model", **changes)
    with pytest.raises(sdrt.ModelLoadError, match=message) as e:
        sdrt.load(folder, device="cpu")
    assert "\n" not in str(e.value) and "is not supported" in str(e.value)


@pytest.fixture(scope="module")
def single_file_tensors(tiny):
    folder, reference = tiny
    return _original_layout(folder, reference)[0]


def _without_second_transformer_block(t: dict, block: str) -> dict:
    prefix = f"model.diffusion_model.{block}.1.transformer_blocks.1."
    return {k: v for k, v in t.items() if not k.startswith(prefix)}


REFUSED_FILES = {
    "playground-v2.5": (lambda t: dict(t, edm_mean=torch.zeros(1, 4, 1, 1), edm_std=torch.ones(1, 4, 1, 1)),
                        "EDM .*Playground v2.5's edm_mean"),
    "cosxl": (lambda t: {**t, "edm_vpred.sigma_max": torch.tensor(80.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
              "EDM .*CosXL.*edm_vpred"),
    "cosxl edit": (lambda t: {**t, "model.diffusion_model.input_blocks.0.0.weight":
                              t["model.diffusion_model.input_blocks.0.0.weight"].repeat(1, 2, 1, 1)},
                   "InstructPix2Pix.*8-channel"),
    "ssd-1b": (lambda t: _without_second_transformer_block(t, "output_blocks.1"),
               "SSD-1B.*64-wide attention layers 1, 2 transformer blocks deep"),
}


@pytest.mark.parametrize("variant", list(REFUSED_FILES))
def test_unsupported_single_file_variants_are_refused_by_name(single_file_tensors, tmp_path, variant):
    change, message = REFUSED_FILES[variant]
    save_file(change(single_file_tensors), str(tmp_path / "model.safetensors"))
    with pytest.raises(sdrt.ModelLoadError, match=message) as e:
        sdrt.load(tmp_path / "model.safetensors", device="cpu")
    assert "\n" not in str(e.value) and "is not supported" in str(e.value)


def test_v_prediction_single_file_markers(single_file_tensors, tmp_path):
    """A v_pred marker makes the file v-prediction, ztsnr adds zero terminal SNR (ComfyUI's and trainers'
    markers); a file with neither stays epsilon."""
    path = tmp_path / "vpred.safetensors"
    save_file(dict(single_file_tensors, v_pred=torch.tensor([]), ztsnr=torch.tensor([])), str(path))
    config = sdrt.load(path, device="cpu").scheduler_config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    save_file(single_file_tensors, str(tmp_path / "eps.safetensors"))
    config = sdrt.load(tmp_path / "eps.safetensors", device="cpu").scheduler_config
    assert config["prediction_type"] == "epsilon" and config["rescale_betas_zero_snr"] is False
