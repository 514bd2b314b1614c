"""TensorRT: the engine cache (key, staleness, atomic writes) without TensorRT; clear errors where
TensorRT or CUDA is missing; engine builds and runs where both are importable."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from sdrt.errors import BackendUnavailableError
from sdrt.export.contracts import ShapeProfile
from sdrt.export.engine_cache import BuildFlags, EngineCache, EngineKey, write_atomic

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
requires_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and a CUDA GPU "
                                  f"(tensorrt importable: {importlib.util.find_spec('tensorrt') is not None}, "
                                  f"CUDA: {torch.cuda.is_available()})")

KEY = EngineKey("unet", "ab" * 32, ShapeProfile(), BuildFlags(), "10.3.0", "NVIDIA H100 80GB HBM3")


def test_key_digest_is_stable_and_covers_every_field():
    assert KEY.digest() == dataclasses.replace(KEY).digest()
    variants = [dataclasses.replace(KEY, component="vae_decoder"),
                dataclasses.replace(KEY, onnx_sha256="cd" * 32),
                dataclasses.replace(KEY, profile=ShapeProfile(batch=(1, 2, 4))),
                dataclasses.replace(KEY, profile=ShapeProfile.static(1, 512, 512)),
                dataclasses.replace(KEY, flags=BuildFlags(precision="bf16")),
                dataclasses.replace(KEY, flags=BuildFlags(refit=True)),
                dataclasses.replace(KEY, tensorrt_version="10.4.0"),
                dataclasses.replace(KEY, gpu_name="NVIDIA A100-SXM4-80GB")]
    digests = {KEY.digest()} | {v.digest() for v in variants}
    assert len(digests) == len(variants) + 1


def test_store_then_load_round_trip(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.load(KEY) is None
    cache.store(KEY, b"plan-bytes")
    assert cache.load(KEY) == b"plan-bytes"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".plan"]  # no temporary files left


def test_damaged_or_foreign_engine_is_rebuilt_never_run(tmp_path):
    cache = EngineCache(tmp_path)
    built = []

    def build():
        built.append(1)
        return b"fresh-plan"

    plan_path, meta_path = cache.paths(KEY)
    cache.store(KEY, b"good-plan")
    plan_path.write_bytes(b"good-plaN")  # same size, altered content
    assert cache.load(KEY) is None
    assert cache.get_or_build(KEY, build) == b"fresh-plan" and len(built) == 1
    assert cache.get_or_build(KEY, build) == b"fresh-plan" and len(built) == 1  # now cached

    # another GPU's engine copied under this key's file names
    other = dataclasses.replace(KEY, gpu_name="NVIDIA GeForce RTX 4090")
    cache.store(other, b"4090-plan")
    for src, dst in zip(cache.paths(other), cache.paths(KEY)):
        dst.write_bytes(src.read_bytes())
    assert cache.load(KEY) is None
    assert cache.get_or_build(KEY, build) == b"fresh-plan" and len(built) == 2


def test_interrupted_write_leaves_no_usable_entry(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)

    def failing_build():
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        cache.get_or_build(KEY, failing_build)
    assert list(tmp_path.iterdir()) == []

    # the plan renamed into place, then the process dies before the metadata is written
    plan_path, meta_path = cache.paths(KEY)
    write_atomic(plan_path, b"plan-without-metadata")
    assert cache.load(KEY) is None

    # a crash while writing the plan leaves neither the plan nor a temporary file behind
    import sdrt.export.engine_cache as engine_cache

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(engine_cache.os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "other.plan", b"x")
    assert not (tmp_path / "other.plan").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_profile_validation():
    from sdrt.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="batch"):
        ShapeProfile(batch=(2, 1, 4)).validate(8)
    with pytest.raises(InvalidInputError, match="multiples of 8"):
        ShapeProfile(height=(250, 512, 1024)).validate(8)
    assert ShapeProfile.static(2, 512, 512).is_static and not ShapeProfile().is_static


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and CUDA are available here")
def test_tensorrt_backend_unavailable_is_a_clear_error():
    from sdrt.backends import prepare_backend

    with pytest.raises(BackendUnavailableError, match="TensorRT|CUDA"):
        prepare_backend("tensorrt", None, torch.device("cpu"), torch.float32)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and CUDA are available here")
def test_cli_build_without_tensorrt_exits_2(tmp_path, capsys):
    from sdrt.cli import main

    assert main(["build", "--onnx", str(tmp_path), "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdrt build: error:") and ("TensorRT" in err or "CUDA" in err)
    assert main(["build", "--onnx", str(tmp_path), "--out", str(tmp_path), "--static", "2x512"]) == 2


# ------------------------------------------------------------------------------- with TensorRT + CUDA
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from factories import save_pipeline

    root = tmp_path_factory.mktemp("trt")
    save_pipeline(root / "sd1", "sd1")
    return root


@requires_trt
@pytest.mark.parametrize("static", [False, True])
def test_engines_match_torch(tiny, static, monkeypatch):
    from sdrt.backends.tensorrt_backend import prepare_engines
    from sdrt.components import load_components

    monkeypatch.setenv("SDRT_CACHE", str(tiny / "cache"))
    reference = load_components(tiny / "sd1", dtype=torch.float32, device="cuda")
    profile = ShapeProfile.static(2, 16, 16) if static else ShapeProfile((1, 2, 4), (16, 16, 32), (16, 16, 32))
    engines = prepare_engines(load_components(tiny / "sd1", dtype=torch.float32, device="cuda"),
                              torch.device("cuda"), torch.float32, profile=profile)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    ctx = torch.randn(2, 77, 128, device="cuda")
    for t in (999.0, 1.0):  # twice: the second call replays the CUDA graph in static mode
        with torch.no_grad():
            ref = reference.unet(x, torch.tensor([t, t], device="cuda"), ctx)
        got = engines.unet(x, t, ctx)
        assert (got.float() - ref).abs().max().item() <= 1e-2  # TensorRT's fp32 uses TF32 tactics
    decoded = engines.vae.decode(x)
    with torch.no_grad():
        assert (decoded.float() - reference.vae.decode(x)).abs().max().item() <= 1e-2


# ------------------------------------------------------------- TensorRT call sequence, with fakes on CPU
class _FakeContext:
    """TensorRT 10's IExecutionContext for an engine whose profile spans sample [1-2, 4, 8, 8]."""

    def __init__(self):
        self.shapes = {}

    def set_input_shape(self, name, shape):
        ok = 1 <= shape[0] <= 2 and shape[1:] == (4, 8, 8)
        if ok:
            self.shapes[name] = shape
        return ok  # TensorRT logs an error and returns False; it does not raise

    def get_tensor_shape(self, name):
        return self.shapes.get("sample", (-1, 4, -1, -1))


class _FakeEngine:
    def get_tensor_profile_shape(self, name, profile_index):
        return [(1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)]


def test_input_shape_outside_the_profile_is_a_clear_error():
    from types import SimpleNamespace

    from sdrt.errors import InvalidInputError
    from sdrt.export.tensorrt import Engine

    engine = Engine.__new__(Engine)  # the call path only; no TensorRT here
    engine.engine, engine.context, engine.device = _FakeEngine(), _FakeContext(), torch.device("cpu")
    engine.contract = SimpleNamespace(name="unet", output_names=("noise_pred",))
    engine.dtypes = {"noise_pred": torch.float32}
    with pytest.raises(InvalidInputError, match=r"sample shape \(4, 4, 8, 8\) is outside the unet engine's "
                                                r"profile \(min \(1, 4, 8, 8\), max \(2, 4, 8, 8\)\)"):
        engine._execute({"sample": torch.zeros(4, 4, 8, 8)})


def test_one_tensorrt_logger_per_process(monkeypatch):
    import sys
    from types import SimpleNamespace

    from sdrt.export import tensorrt as trt_export

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(Logger=Logger))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    clear = getattr(trt_export._logger, "cache_clear", lambda: None)  # no TensorRT logger from another test
    clear()
    try:
        assert trt_export._logger() is trt_export._logger()
    finally:
        clear()
