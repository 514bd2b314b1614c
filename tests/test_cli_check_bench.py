"""`sdrt check` and `sdrt bench` on the CPU with the tiny random model. Target: < 20 s on 2 CPU cores."""
from __future__ import annotations

import json

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


def test_bench_on_cpu_writes_table_json_and_png(tmp_path, capsys):
    code = main(["bench", "--device", "cpu", "--steps", "2", "--runs", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "U-Net it/s" in printed and "sdrt torch" in printed
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert result["rows"][0]["name"] == "sdrt torch" and result["rows"][0]["unet_its"] > 0
    assert result["rows"][0]["latency_p50_s"] <= result["rows"][0]["latency_p90_s"]
    names = [r["name"] for r in result["rows"]]
    assert "diffusers eager" in names  # run, or skipped with its reason when diffusers is missing
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
