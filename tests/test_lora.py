"""LoRA: sdrt's fused LoRAs against diffusers' `load_lora_weights` + `fuse_lora` on the same random tiny models
and the same random LoRA files (kohya with LoCon convs and alpha, diffusers/PEFT), U-Net and text encoder, two at
once at different scales; exact restore on unload; bad files refused before anything changes.
Tolerances: latents <= 1e-3 (as tests/test_pipeline.py); weights after unload torch.equal."""
from __future__ import annotations

import hashlib

import pytest
import torch

import sdrt
from sdrt.errors import InvalidInputError, ModelLoadError
from sdrt.graphs import DenoiseGraphs, GraphCache
from sdrt.lora.targets import TargetTable

from factories import save_pipeline
from lora_files import write_kohya, write_peft

LATENT_TOL = 1e-3
GEN = dict(steps=3, height=16, width=16, seed=5, guidance_scale=7.5)
SCALES = (0.7, 0.4)


def _sdrt_latents(pipe, prompt="a red cube") -> torch.Tensor:
    return pipe(prompt, output="latent", **GEN).latents


def _diffusers_latents(reference, prompt="a red cube") -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(GEN["seed"])
    return reference(prompt, num_inference_steps=GEN["steps"], height=16, width=16, guidance_scale=7.5,
                     generator=g, output_type="latent").images


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference = save_pipeline(root / "model", request.param)
    a, b = root / "kohya_locon.safetensors", root / "peft.safetensors"
    write_kohya(a, reference, seed=1, alpha=2.0)
    write_peft(b, reference, seed=2)
    return request.param, root, reference, (a, b)


def test_two_loras_at_their_scales_match_diffusers_and_unload_exactly(model):
    kind, root, reference, files = model
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    before, base = _weights(pipe), _sdrt_latents(pipe)
    names = [pipe.load_lora(f, scale=s) for f, s in zip(files, SCALES)]
    assert names == [f.stem for f in files] and pipe.loras == dict(zip(names, SCALES))
    ours = _sdrt_latents(pipe)

    for f, name in zip(files, names):
        reference.load_lora_weights(str(f), adapter_name=name)
    reference.set_adapters(names, list(SCALES))
    reference.fuse_lora(adapter_names=names, lora_scale=1.0)
    try:
        theirs = _diffusers_latents(reference)
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
    assert (ours - base).abs().max() > 100 * LATENT_TOL  # the LoRAs do change the picture
    assert (ours - theirs).abs().max().item() <= LATENT_TOL

    pipe.unload_lora()
    assert pipe.loras == {}
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_sdrt_latents(pipe), base)


def test_rescale_equals_a_fresh_load_and_unload_one_keeps_the_other(model):
    _, root, _, (a, b) = model
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    before = _weights(pipe)
    pipe.load_lora(a, scale=1.0, name="a")
    pipe.load_lora(b, scale=0.5, name="b")
    pipe.set_lora_scale("a", 0.25)
    fresh = sdrt.load(root / "model", device="cpu", dtype="float32")
    fresh.load_lora(a, scale=0.25, name="a")
    fresh.load_lora(b, scale=0.5, name="b")
    assert all(torch.equal(v, fresh_v) for v, fresh_v in zip(_weights(pipe).values(), _weights(fresh).values()))
    pipe.unload_lora("a")
    fresh.unload_lora()
    fresh.load_lora(b, scale=0.5, name="b")
    assert pipe.loras == {"b": 0.5}
    assert all(torch.equal(v, fresh_v) for v, fresh_v in zip(_weights(pipe).values(), _weights(fresh).values()))
    pipe.unload_lora("b")
    assert all(torch.equal(before[k], v) for k, v in _weights(pipe).items())


def test_ldm_names_and_no_alpha_read_as_diffusers_names(model, tmp_path):
    """kohya keys in the original `input_blocks_*` naming are the same layers as in diffusers' naming."""
    _, root, reference, _ = model
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    ldm = {t.module: flat for flat, t in TargetTable(pipe.unet, pipe.text_encoder).kohya.items()
           if t.component == "unet" and flat.removeprefix("lora_unet_") != t.module.replace(".", "_")}
    ldm_names = {module: flat.removeprefix("lora_unet_") for module, flat in ldm.items()}
    assert any(n.startswith("input_blocks_") for n in ldm_names.values())
    write_kohya(tmp_path / "diffusers_names.safetensors", reference, seed=3, alpha=None)
    write_kohya(tmp_path / "ldm_names.safetensors", reference, seed=3, alpha=None,
                ldm_names={m: n.replace("_", ".") for m, n in ldm_names.items()})
    pipe.load_lora(tmp_path / "diffusers_names.safetensors")
    by_diffusers_names = _weights(pipe)
    pipe.unload_lora()
    pipe.load_lora(tmp_path / "ldm_names.safetensors")
    assert all(torch.equal(v, by_diffusers_names[k]) for k, v in _weights(pipe).items())


def test_a_lora_after_warmup_changes_the_graphed_loop_without_a_new_capture(model):
    _, root, _, (a, _) = model
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    pipe.denoiser = DenoiseGraphs(GraphCache(), capture=False)  # on CPU the graphed path runs uncaptured
    base = _sdrt_latents(pipe)
    captures = pipe.denoiser.cache.captures
    pipe.load_lora(a, scale=0.8)
    with_lora = _sdrt_latents(pipe)
    assert pipe.denoiser.cache.captures == captures == 1
    assert (with_lora - base).abs().max() > 100 * LATENT_TOL


def test_fusing_never_writes_to_the_model_files(model):
    _, root, _, (a, b) = model
    files = sorted((root / "model").rglob("*.safetensors"))
    digest = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    pipe.load_lora(a)
    pipe.load_lora(b, scale=-1.0)
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == digest


def test_bad_lora_files_are_one_line_errors_that_change_nothing(model, tmp_path):
    from safetensors.torch import save_file

    kind, root, reference, (a, _) = model
    pipe = sdrt.load(root / "model", device="cpu", dtype="float32")
    pipe.load_lora(a, scale=0.5, name="good")
    before = _weights(pipe)
    good = dict(write_kohya(tmp_path / "base.safetensors", reference, seed=4))
    bad = {
        "unknown_layer": dict(good, **{"lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 8)}),
        "wrong_shape": dict(good, **{next(k for k in good if k.endswith("to_q.lora_up.weight")): torch.zeros(7, 4)}),
        "missing_up": {k: v for k, v in good.items() if not k.endswith("to_k.lora_up.weight")},
        "unknown_part": dict(good, **{"lora_unet_conv_in.dora_scale": torch.ones(1)}),
        "nan": dict(good, **{next(k for k in good if k.endswith("ff_net_2.lora_up.weight")):
                             torch.full_like(good[next(k for k in good if k.endswith("ff_net_2.lora_up.weight"))],
                                             float("nan"))}),
    }
    expected = {"unknown_layer": "names no layer", "wrong_shape": "does not fit", "missing_up": "missing up",
                "unknown_part": "unsupported LoRA tensor", "nan": "NaN"}
    for label, tensors in bad.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(InvalidInputError, match=expected[label]) as err:
            pipe.load_lora(path)
        assert isinstance(err.value, ModelLoadError) and "\n" not in str(err.value)
        assert pipe.loras == {"good": 0.5}
        assert all(torch.equal(before[k], v) for k, v in _weights(pipe).items())
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(InvalidInputError, match="missing weights file"):
        pipe.load_lora(missing)
    for call, match in ((lambda: pipe.load_lora(a, name="good"), "already loaded"),
                        (lambda: pipe.set_lora_scale("nope", 1.0), "no LoRA named 'nope'"),
                        (lambda: pipe.unload_lora("nope"), "loaded: 'good'"),
                        (lambda: pipe.load_lora(a, scale=float("inf"), name="x"), "finite number")):
        with pytest.raises(InvalidInputError, match=match):
            call()
