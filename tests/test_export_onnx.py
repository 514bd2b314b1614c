"""ONNX export: every component vs the fp32 torch reference through ONNX Runtime (CPU), dynamic batch
and resolution, the manifest, resumable/atomic directories, external data, fp16, the dynamo exporter
and the `sdrt export` CLI. One export per model kind is shared by the module."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from factories import save_pipeline
from sdrt.components import load_components
from sdrt.errors import InvalidInputError, ModelLoadError
from sdrt.export import onnx as onnx_export
from sdrt.export.contracts import COMPONENTS, contracts_for
from sdrt.export.onnx import MANIFEST, export_onnx, read_export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FP32_TOL = 1e-4
# (batch, latent height, latent width): the traced size, a second non-square resolution at batch 2, odd sizes
CASES = [(1, 8, 8), (2, 12, 6), (2, 9, 7)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("sd1", "sd2"):
        save_pipeline(root / kind, kind)
    return root


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, model_dirs, tmp_path_factory):
    components = load_components(model_dirs / request.param)
    return components, export_onnx(components, tmp_path_factory.mktemp("onnx") / request.param)


@pytest.fixture(scope="module")
def sd1(model_dirs):
    return load_components(model_dirs / "sd1")


def run_and_compare(components, export, name, cases=CASES, dtype=torch.float32):
    """Max abs error of ONNX Runtime vs the torch module in `components`, over `cases`."""
    contract = contracts_for(components)[name]
    module = contract.module(components).eval()
    session = ort.InferenceSession(str(export.path(name)), providers=["CPUExecutionProvider"])
    scale, worst = components.vae.config.downsample_factor, 0.0
    for batch, h, w in cases:
        inputs = contract.sample_inputs(batch, h * scale, w * scale, dtype, seed=batch + h)
        with torch.no_grad():
            ref = module(*inputs.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run(list(contract.output_names), {k: v.numpy() for k, v in inputs.items()})
        for r, g in zip(ref, got):
            assert g.shape == tuple(r.shape)
            worst = max(worst, float(np.abs(g.astype(np.float32) - r.float().numpy()).max()))
    return worst


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_matches_torch_at_two_resolutions_and_batches(exported, name):
    components, export = exported
    assert run_and_compare(components, export, name) <= FP32_TOL


def test_manifest_and_graphs(exported):
    components, export = exported
    manifest = json.loads((export.directory / MANIFEST).read_text())
    assert set(manifest["components"]) == set(COMPONENTS)
    assert manifest["dtype"] == "float32" and manifest["opset"] >= 17
    assert manifest["source"] == components.source
    for name in COMPONENTS:
        model = onnx.load(str(export.path(name)))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input]
        assert all(batch_dims), f"{name}: batch axis is not symbolic"
        entry = manifest["components"][name]
        assert set(entry["files"]) == {f"{name}.onnx"}
        assert entry["inputs"]["timestep" if name == "unet" else next(iter(entry["inputs"]))]["shape"][0] == "batch"
    assert manifest["components"]["unet"]["inputs"]["timestep"]["dtype"] == "float32"


def test_finished_export_is_reused(exported, monkeypatch):
    components, export = exported
    monkeypatch.setattr(onnx_export, "_export_component", lambda *a, **k: pytest.fail("re-exported"))
    again = export_onnx(components, export.directory)
    assert again.manifest == export.manifest


def test_interrupted_export_is_never_taken_as_finished_and_resumes(sd1, tmp_path, monkeypatch):
    out, names = tmp_path / "onnx", ("text_encoder", "vae_decoder")
    real = onnx_export._export_component
    exported = []

    def interrupted(components, contract, *args):
        if contract.name == "vae_decoder":
            raise KeyboardInterrupt
        exported.append(contract.name)
        return real(components, contract, *args)

    monkeypatch.setattr(onnx_export, "_export_component", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(sd1, out, names=names)
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="not a finished ONNX export"):
        read_export(out)

    def resumed(components, contract, *args):
        exported.append(contract.name)
        return real(components, contract, *args)

    monkeypatch.setattr(onnx_export, "_export_component", resumed)
    export = export_onnx(sd1, out, names=names)
    assert exported == ["text_encoder", "vae_decoder"]  # text_encoder was not redone
    assert export.components == names and not out.with_name("onnx.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "text_encoder.onnx", "vae_decoder.onnx"]
    assert run_and_compare(sd1, export, "vae_decoder", CASES[:1]) <= FP32_TOL

    # a truncated file: a clear error on read, and a redo on export
    shutil.copytree(out, tmp_path / "damaged")
    damaged = tmp_path / "damaged" / "vae_decoder.onnx"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="vae_decoder.onnx is truncated"):
        read_export(tmp_path / "damaged")
    redone = export_onnx(sd1, tmp_path / "damaged", names=names)
    assert read_export(redone.directory).manifest["components"] == redone.manifest["components"]


def test_truncated_graph_gives_model_load_error_from_onnxruntime_backend(sd1, tmp_path):
    from sdrt.backends.onnxruntime_backend import OrtModel

    path = tmp_path / "unet.onnx"
    path.write_bytes(b"\x08\x07\x12\x07pytorch" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load"):
        OrtModel(path, contracts_for(sd1)["unet"], torch.device("cpu"), torch.float32)


def test_external_data(sd1, tmp_path):
    export = export_onnx(sd1, tmp_path / "onnx", names=("vae_decoder",), external_data_threshold=0)
    assert set(export.manifest["components"]["vae_decoder"]["files"]) == {"vae_decoder.onnx", "vae_decoder.onnx.data"}
    assert (tmp_path / "onnx" / "vae_decoder.onnx").stat().st_size < 100_000  # weights live in the .data file
    assert run_and_compare(sd1, export, "vae_decoder", CASES[:2]) <= FP32_TOL


def test_dynamo_exporter(sd1, tmp_path):
    export = export_onnx(sd1, tmp_path / "onnx", names=("unet",), exporter="dynamo")
    assert export.manifest["exporter"] == "dynamo" and export.manifest["opset"] == 18
    assert run_and_compare(sd1, export, "unet") <= FP32_TOL


def test_fp16_export_error_is_within_twice_torch_fp16_error(model_dirs, sd1, tmp_path):
    half = load_components(model_dirs / "sd1", dtype=torch.float16)
    export = export_onnx(half, tmp_path / "onnx", names=("unet",))
    assert export.dtype == torch.float16
    contract = contracts_for(sd1)["unet"]
    session = ort.InferenceSession(str(export.path("unet")), providers=["CPUExecutionProvider"])
    inputs = contract.sample_inputs(2, 24, 16, torch.float32)
    with torch.no_grad():
        ref = sd1.unet(*inputs.values())
        torch_half = half.unet(*(v if v.dtype != torch.float32 or k == "timestep" else v.half()
                                 for k, v in inputs.items())).float()
    feed = {k: (v if k == "timestep" else v.to(contract.input_dtype(k, torch.float16))).numpy()
            for k, v in inputs.items()}
    got = torch.from_numpy(session.run(None, feed)[0]).float()
    torch_err = (torch_half - ref).abs().max().item()
    assert got.dtype == torch.float32 and (got - ref).abs().max().item() <= 2 * torch_err


def test_fp16_text_encoder_export_keeps_its_causal_attention_in_fp16(model_dirs, sd1, tmp_path):
    # TorchScript's causal-SDPA symbolic builds its mask in float32, which promoted half of each CLIP
    # layer to float32 and failed ONNX validation (LayerNormalization scale type) for every fp16 export
    half = load_components(model_dirs / "sd1", dtype=torch.float16)
    export = export_onnx(half, tmp_path / "onnx", names=("text_encoder",))
    contract = contracts_for(sd1)["text_encoder"]
    ids = contract.sample_inputs(2, 16, 16, torch.float32)["input_ids"]
    with torch.no_grad():
        ref = sd1.text_encoder(ids)
        torch_err = (half.text_encoder(ids).float() - ref).abs().max().item()
    session = ort.InferenceSession(str(export.path("text_encoder")), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    assert got.dtype == np.float16
    assert (torch.from_numpy(got).float() - ref).abs().max().item() <= 2 * torch_err


def test_bad_arguments(sd1, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="not an sdrt ONNX export"):
        export_onnx(sd1, foreign, names=("text_encoder",))
    assert (foreign / "cat.png").exists()
    with pytest.raises(InvalidInputError, match="components must be"):
        export_onnx(sd1, tmp_path / "x", names=("unet", "refiner"))
    with pytest.raises(InvalidInputError, match="opset"):
        export_onnx(sd1, tmp_path / "x", opset=13)


def _cli(*argv) -> int:
    from sdrt.cli import main

    return main(list(argv))


def test_cli_export(model_dirs, tmp_path, capsys):
    assert _cli("export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")) == 2
    assert "model not found" in capsys.readouterr().err
    assert _cli("export", "--model", str(model_dirs / "sd1"), "--out", str(tmp_path / "o"),
                "--components", "text_encoder,refiner") == 2
    assert _cli("export", "--model", str(model_dirs / "sd1"), "--out", str(tmp_path / "o"),
                "--components", "text_encoder") == 0
    assert read_export(tmp_path / "o").components == ("text_encoder",)


@pytest.mark.parametrize("device", ["meta", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_cli_export_bad_device_is_a_one_line_error(model_dirs, tmp_path, capsys, device):
    assert _cli("export", "--model", str(model_dirs / "sd1"), "--out", str(tmp_path / "o"), "--device", device) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdrt export: error: device") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_export_reports_the_opset_it_used(model_dirs, tmp_path, capsys):
    # the dynamo exporter raises opset 17 to 18; the summary line must say what was written
    assert _cli("export", "--model", str(model_dirs / "sd1"), "--out", str(tmp_path / "o"),
                "--components", "text_encoder", "--exporter", "dynamo") == 0
    assert "opset 18" in capsys.readouterr().out and read_export(tmp_path / "o").manifest["opset"] == 18


def test_concurrent_exports_to_one_folder_both_succeed(model_dirs, tmp_path):
    # two processes on first use of one export folder (e.g. two `sdrt generate --backend onnxruntime`):
    # the second used to delete the first's staged files and die with a traceback
    import subprocess
    import sys

    argv = [sys.executable, "-m", "sdrt.cli", "export", "--model", str(model_dirs / "sd1"), "--out",
            str(tmp_path / "o"), "--components", "text_encoder"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert read_export(tmp_path / "o").components == ("text_encoder",)
