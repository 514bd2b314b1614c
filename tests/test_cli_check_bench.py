"""`sdrt check` and `sdrt bench` on the CPU with the tiny random model. Target: < 20 s on 2 CPU cores."""
from __future__ import annotations

import json

import pytest

from sdrt.cli import main


def test_check_torch_backend_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["check", "--model", "random:tiny", "--backend", "torch", "--device", "cpu", "--steps", "3",
                 "--prompt", "a red cube", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "text_encoder" in printed and "image" in printed and printed.strip().endswith("PASS")
    assert "matmul policy: TF32 off" in printed
    report = json.loads(out.read_text())
    assert report["passed"] is True and [r["component"] for r in report["rows"]] == ["text_encoder", "unet",
                                                                                   "vae_decode", "image"]
    # a second float32 run, judged against the reference itself: it reproduces it exactly
    assert report["baseline"] == "the float32 reference" and not report["baseline_only"]
    assert all(r["backend"]["max_abs"] == 0 and r["baseline"]["max_abs"] == 0 for r in report["rows"])


def test_check_torch_backend_in_low_precision_is_baseline_only(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["check", "--model", "random:tiny", "--backend", "torch", "--device", "cpu", "--dtype", "bfloat16",
                 "--steps", "2", "--prompt", "a red cube", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "BASELINE ONLY" in printed and "PASS" not in printed
    report = json.loads(out.read_text())
    assert report["baseline_only"] and report["passed"] is None and report["rows"][-1]["baseline"]["max_abs"] > 0


def test_check_bad_input_exits_2_with_one_line(capsys):
    assert main(["check", "--model", "random:tiny", "--backend", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "backend" in err


def test_bench_on_cpu_writes_table_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))  # the onnxruntime/openvino rows' ONNX export
    code = main(["bench", "--device", "cpu", "--steps", "2", "--runs", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "U-Net it/s" in printed and "sdrt torch" in printed
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["rows"][0]["name"] == "sdrt torch" and result["rows"][0]["unet_its"] > 0
    assert result["rows"][0]["latency_p50_s"] <= result["rows"][0]["latency_p90_s"]
    names = [r["name"] for r in result["rows"]]
    assert "diffusers eager" in names  # run, or skipped with its reason when diffusers is missing
    assert names == ["sdrt torch", "diffusers eager", "sdrt onnxruntime", "sdrt openvino"]
    assert all(r["unet_its"] > 0 and r["peak_memory_mb"] > 0 for r in result["rows"])  # CPU: peak RSS
    ratios = {r["name"]: r["speedup"] for r in result["rows"]}
    assert ratios["diffusers eager"] is None
    for name in ("sdrt torch", "sdrt onnxruntime", "sdrt openvino"):
        assert ratios[name] == pytest.approx(result["speedups"][f"{name} / diffusers eager"])
        assert f"speedup (U-Net it/s) {name} / diffusers eager" in printed
    png = next(tmp_path.glob("bench-*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_keeps_finished_rows_when_a_later_row_dies(tmp_path, monkeypatch, capsys):
    from sdrt.bench import side_by_side

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what `timeout --signal=INT` delivers midway through a row

    monkeypatch.setattr(side_by_side, "diffusers_row", killed)
    main(["bench", "--device", "cpu", "--steps", "2", "--runs", "2", "--out", str(tmp_path)])
    capsys.readouterr()
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert not result["complete"] and [r["name"] for r in result["rows"]] == ["sdrt torch"]
    assert result["rows"][0]["unet_its"] > 0


def test_bench_repeats_merge_into_one_row_per_name():
    from sdrt.bench.side_by_side import Row, merge_repeats

    def rep(loops, latencies, first, peak):
        return Row("sdrt openvino", "sd15", 1, 256, 3, "float32", unet_its=3 / loops[0], first_call_s=first,
                   peak_memory_mb=peak, runs=1, notes=dict(first_calls_s=[first], latencies_s=latencies,
                                                           loops_s=loops, load_averages=[[2.0, 1.0, 0.5]]))

    merged = merge_repeats([rep([6.0], [8.0], 30.0, 900.0), rep([3.0], [4.0], 10.0, 1000.0),
                            rep([4.0], [5.0], 11.0, 950.0)])
    assert merged.unet_its == 3 / 4.0  # the median loop over every repetition
    assert merged.latency_p50_s == 5.0 and merged.first_call_s == 30.0 and merged.peak_memory_mb == 1000.0
    assert merged.runs == 3 and merged.notes["repeats"] == 3 and merged.notes["first_calls_s"] == [30.0, 10.0, 11.0]
