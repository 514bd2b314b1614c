"""`sdrt generate --lora PATH[:SCALE] --lora-dir DIR --embedding PATH[:TOKEN]`, <lora:> tags in the prompt, and PNG
parameters that record all of it (prompt as typed, LoRAs with scales and A1111 short hashes, embeddings) so that
the image regenerates pixel for pixel from its own parameters."""
from __future__ import annotations

import hashlib

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch

from cli_run import assert_refused, sdrt
from factories import save_pipeline
from lora_files import write_kohya, write_peft
from sdrt.png import read_parameters


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-lora")
    reference = save_pipeline(root / "model", "sd1")
    (root / "loras").mkdir()
    write_kohya(root / "detail.safetensors", reference, seed=1, alpha=2.0)
    write_peft(root / "loras" / "style.safetensors", reference, seed=2)
    width = reference.text_encoder.config.hidden_size
    safetensors.torch.save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(4))},
                                str(root / "shiny.safetensors"))
    return root


def _addnet_hash(path) -> str:
    """A1111's LoRA short hash, computed here independently: SHA-256 of the bytes after the header, 12 digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_loras_tags_and_embeddings_are_recorded_and_regenerate(files, tmp_path):
    prompt = "a (shiny:1.2) cube <lora:style:0.4> BREAK red"
    first, plain = tmp_path / "first.png", tmp_path / "plain.png"
    common = ["--model", files / "model", "--steps", 2, "--seed", 7, "--device", "cpu"]
    run = sdrt("generate", prompt, "-o", first, *common, "--lora", f"{files / 'detail.safetensors'}:0.7",
               "--lora-dir", files / "loras", "--embedding", f"{files / 'shiny.safetensors'}:shiny")
    assert run.returncode == 0, run.stderr
    params = read_parameters(first)
    assert params["prompt"] == prompt
    assert [(x["name"], x["scale"], x["from"]) for x in params["loras"]] == [("detail", 0.7, "--lora"),
                                                                            ("style", 0.4, "tag")]
    hashes = {"detail": _addnet_hash(files / "detail.safetensors"), "style": _addnet_hash(files / "loras" / "style.safetensors")}
    assert params["lora_hashes"] == f"detail: {hashes['detail']}, style: {hashes['style']}"
    assert params["embeddings"][0]["token"] == "shiny"
    assert params["embeddings"][0]["hash"] == hashlib.sha256((files / "shiny.safetensors").read_bytes()).hexdigest()[:12]

    again = tmp_path / "again.png"
    adapters = [a for x in params["loras"] if x["from"] == "--lora" for a in ("--lora", f"{x['path']}:{x['scale']}")]
    adapters += [a for d in params["lora_dirs"] for a in ("--lora-dir", d)]
    adapters += [a for e in params["embeddings"] for a in ("--embedding", f"{e['path']}:{e['token']}")]
    run = sdrt("generate", params["prompt"], "-o", again, "--model", params["model"], "--steps", params["steps"],
               "--seed", params["seed"], "--device", params["device"], *adapters)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(PIL.Image.open(first)), np.asarray(PIL.Image.open(again)))

    run = sdrt("generate", "a (shiny:1.2) cube  BREAK red", "-o", plain, *common,
               "--embedding", f"{files / 'shiny.safetensors'}:shiny")
    assert run.returncode == 0, run.stderr
    assert not np.array_equal(np.asarray(PIL.Image.open(first)), np.asarray(PIL.Image.open(plain)))


@pytest.mark.parametrize("args, words", [
    (["--lora", "/nonexistent/a.safetensors"], ["--lora", "no such file"]),
    (["--lora", "{detail}:lots"], ["--lora", "finite number", "'lots'"]),
    (["--embedding", "/nonexistent/e.pt:tok"], ["--embedding", "no such file"]),
    (["--lora-dir", "/nonexistent/loras"], ["--lora-dir", "not a folder"]),
])
def test_bad_adapter_arguments_are_one_line_errors(files, tmp_path, args, words):
    args = [a.format(detail=files / "detail.safetensors") for a in args]
    assert_refused(sdrt("generate", "x", "-o", tmp_path / "out.png", *args), tmp_path, *words)


def test_a_tag_without_lora_dir_is_refused(files, tmp_path):
    assert_refused(sdrt("generate", "x <lora:style:1>", "-o", tmp_path / "out.png", "--model", files / "model",
                        "--steps", 1, "--device", "cpu"), tmp_path, "--lora-dir")
