"""`sdrt serve` as a real server process on a free loopback port, driven over HTTP by raw requests and by two
real clients from PyPI: `webuiapi` (AUTOMATIC1111's Python client) and `openai`. Bundled tiny model (64x64).

Timing-dependent tests (full queue, timeout, disconnect, drain) make their slow request slow in steps
measured on this machine at start (`slow_steps`), so they hold on a loaded CI machine and on a quiet one.
"""
from __future__ import annotations

import base64
import os
import concurrent.futures
import io
import json
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import PIL.Image
import pytest

from sdrt.bench.serve_process import ServerProcess
from sdrt.serve.a1111_api import SAMPLERS

import openai
import webuiapi

PROMPT = "a red circle on a blue background"
KEY = "test-key-123"


def _png(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _b64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _metric(server: ServerProcess, name: str, headers=None) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _txt2img(server: ServerProcess, timeout: float = 120, headers=None, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, "sampler_name": "Euler a", **fields}
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=timeout, headers=headers)


@pytest.fixture(scope="module")
def server():
    """Batching server: 4 images per batch, a generous company window, small limits to test."""
    with ServerProcess(["--max-batch", "4", "--batch-wait-ms", "400", "--max-steps", "60", "--max-images", "8",
                        "--max-body-mb", "1"]) as process:
        yield process


@pytest.fixture(scope="module")
def guarded():
    """One image per batch, a queue of 2, an API key."""
    with ServerProcess(["--max-batch", "1", "--queue", "2", "--api-key-env", "SDRT_TEST_KEY", "--max-steps", "1000"],
                       env={"SDRT_TEST_KEY": KEY}) as process:
        yield process


@pytest.fixture(scope="module")
def step_seconds(server) -> float:
    """Seconds per denoising step of one image here, now (8 steps vs 2 on the batching server).

    The fastest of three runs each: other load on the machine only ever adds time, and an overestimate
    would make the "slow" requests below too short to outlast a timeout or a queue check.
    """
    times = {2: float("inf"), 8: float("inf")}
    for _ in range(3):
        for steps in times:
            start = time.monotonic()
            assert _txt2img(server, steps=steps, seed=9).status_code == 200
            times[steps] = min(times[steps], time.monotonic() - start)
    return max((times[8] - times[2]) / 6, 0.002)


def _slow(step_seconds: float, seconds: float) -> int:
    """Steps that keep the worker busy for about `seconds`."""
    return int(min(1000, max(20, seconds / step_seconds)))


def _running(server: ServerProcess, headers=None) -> bool:
    return _metric(server, "sdrt_batch_running_images", headers) > 0


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from sdxl_factories import save_sdxl
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    save_sdxl(folder)
    return folder


def test_an_sdxl_model_is_served_with_the_pipelines_pictures(sdxl_folder):
    """SDXL goes through the same endpoints: txt2img and img2img equal the pipeline's own call for the seed
    (under the server's batch-invariant CPU kernels)."""
    import sdrt
    from sdrt.serve.runner import batch_invariant_kernels
    with ServerProcess(["--model", str(sdxl_folder), "--max-batch", "2"]) as server:
        assert httpx.get(f"{server.url}/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny-sdxl"
        served = _txt2img(server, seed=7, steps=2, cfg_scale=5.0, width=64, height=64).json()
        start = PIL.Image.fromarray(_png(served["images"][0]))
        edited = httpx.post(f"{server.url}/sdapi/v1/img2img", json={
            "prompt": PROMPT, "init_images": [_b64(start)], "steps": 4, "seed": 8, "cfg_scale": 5.0,
            "sampler_name": "Euler a", "denoising_strength": 0.5}, timeout=600).json()
    pipe = sdrt.load(sdxl_folder, device="cpu")
    with batch_invariant_kernels(pipe.device):
        # A1111's empty negative prompt is "" (encoded), not None (SDXL's zero negative embeddings)
        same = {"negative_prompt": "", "guidance_scale": 5.0, "scheduler": "euler_a"}
        alone = pipe(PROMPT, steps=2, seed=7, height=64, width=64, **same).images[0]
        again = pipe(PROMPT, image=start, strength=0.5, steps=4, seed=8, **same).images[0]
    assert np.array_equal(_png(served["images"][0]), np.asarray(alone.convert("RGB")))
    assert np.array_equal(_png(edited["images"][0]), np.asarray(again.convert("RGB")))


def test_a_lora_tag_is_served_as_the_pipeline_loads_it(tmp_path):
    """<lora:NAME:W> against the server's --lora-dir: the picture equals the pipeline's own with load_lora at
    that scale, the next request without the tag equals the plain model's, and the parameters carry A1111's
    `Lora hashes` (in info and in the PNG)."""
    import diffusers
    import sdrt
    from lora_files import write_kohya
    from sdrt.components import BUNDLED_MODEL
    from sdrt.file_hashes import short_hash
    from sdrt.serve.runner import batch_invariant_kernels
    folder = tmp_path / "loras"
    folder.mkdir()
    tiny = sdrt.load(BUNDLED_MODEL, device="cpu")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(BUNDLED_MODEL), safety_checker=None)
    write_kohya(folder / "style.safetensors", reference, seed=3, rank=2)
    same = {"seed": 5, "steps": 2, "cfg_scale": 7.0}
    with ServerProcess(["--lora-dir", str(folder), "--max-batch", "2"]) as server:
        assert httpx.get(f"{server.url}/sdapi/v1/loras").json() == [{"name": "style", "alias": "style"}]
        tagged = _txt2img(server, prompt=PROMPT + " <lora:style:0.7>", **same).json()
        plain = _txt2img(server, **same).json()
    info = json.loads(tagged["info"])
    hashes = f'Lora hashes: "style: {short_hash(folder / "style.safetensors")}"'
    assert info["prompt"] == PROMPT + " <lora:style:0.7>" and hashes in info["infotexts"][0]
    png = PIL.Image.open(io.BytesIO(base64.b64decode(tagged["images"][0])))
    assert hashes in png.info["parameters"] and "Lora hashes" not in json.loads(plain["info"])["infotexts"][0]
    kwargs = dict(steps=2, seed=5, guidance_scale=7.0, scheduler="euler_a", negative_prompt="")
    with batch_invariant_kernels(tiny.device):
        tiny.load_lora(folder / "style.safetensors", scale=0.7)
        with_lora = np.asarray(tiny(PROMPT + " ", **kwargs).images[0].convert("RGB"))
        tiny.unload_lora()
        without = np.asarray(tiny(PROMPT, **kwargs).images[0].convert("RGB"))
    assert np.array_equal(_png(tagged["images"][0]), with_lora)
    assert np.array_equal(_png(plain["images"][0]), without)
    assert not np.array_equal(with_lora, without)


# ------------------------------------------------------------------------------------------ AUTOMATIC1111
def test_webuiapi_txt2img_answers_as_automatic1111(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2)
    result = api.txt2img(prompt=PROMPT, negative_prompt="a green square", seed=41, cfg_scale=5.5, width=64, height=64,
                         batch_size=2, n_iter=1)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [41, 42] and result.info["seed"] == 41
    assert result.info["all_prompts"] == [PROMPT] * 2 and result.info["sampler_name"] == "Euler a"
    assert "Seed: 42" in result.info["infotexts"][1]
    assert result.parameters["cfg_scale"] == 5.5 and result.parameters["prompt"] == PROMPT
    assert "Seed: 41" in result.images[0].info["parameters"]  # the PNG text chunk, as A1111 writes it
    # image k of a batch is the image its seed gives alone (n_iter x batch_size is only a grouping)
    alone = api.txt2img(prompt=PROMPT, negative_prompt="a green square", seed=42, cfg_scale=5.5, width=64, height=64)
    assert np.array_equal(np.asarray(alone.image), np.asarray(result.images[1]))


def test_seed_minus_one_is_random_and_reported(server):
    answers = [_txt2img(server, seed=-1, steps=1).json() for _ in range(2)]
    seeds = [json.loads(a["info"])["seed"] for a in answers]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)
    again = _txt2img(server, seed=seeds[0], steps=1).json()
    assert np.array_equal(_png(again["images"][0]), _png(answers[0]["images"][0]))


def test_each_sampler_name_is_served(server):
    listed = httpx.get(f"{server.url}/sdapi/v1/samplers").json()
    assert [s["name"] for s in listed] == list(SAMPLERS)
    images = {}
    for name in SAMPLERS:
        response = _txt2img(server, sampler_name=name, steps=2, eta=0.0 if name == "DDIM" else None)
        assert response.status_code == 200, (name, response.text)
        assert json.loads(response.json()["info"])["sampler_name"] == name
        images[name] = _png(response.json()["images"][0])
    for a, b in (("Euler a", "Euler"), ("DPM++ 2M", "DPM++ 2M Karras"), ("DDIM", "LCM")):  # really other samplers
        assert not np.array_equal(images[a], images[b]), (a, b)
    karras = _txt2img(server, sampler_name="DPM++ 2M", scheduler="karras", steps=2).json()
    assert np.array_equal(_png(karras["images"][0]), images["DPM++ 2M Karras"])
    alias = _txt2img(server, sampler_name="k_euler_a", steps=2).json()
    assert np.array_equal(_png(alias["images"][0]), images["Euler a"])


def test_img2img_and_inpainting(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=4)
    picture = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    varied = api.img2img(images=[picture], prompt=PROMPT, denoising_strength=0.5, seed=3, width=64, height=64)
    assert varied.image.size == (64, 64) and varied.info["denoising_strength"] == 0.5
    assert not np.array_equal(np.asarray(varied.image), np.asarray(picture))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255  # white = repaint
    painted = api.img2img(images=[picture], mask_image=PIL.Image.fromarray(mask), prompt=PROMPT,
                          denoising_strength=1.0, seed=3, width=64, height=64)
    out, source = np.asarray(painted.image.convert("RGB")), np.asarray(picture)
    assert np.array_equal(out[mask == 0], source[mask == 0])  # outside the mask: the input, exactly
    assert np.abs(out[mask == 255].astype(int) - source[mask == 255]).mean() > 20
    # an input of another size is resized to width x height (AUTOMATIC1111's "just resize")
    small = api.img2img(images=[picture.resize((32, 32))], prompt=PROMPT, denoising_strength=0.5, seed=3,
                        width=64, height=64)
    assert small.image.size == (64, 64)


@pytest.mark.parametrize("fields, field", [
    ({"steps": "many"}, "steps"),
    ({"steps": 0}, "steps"),
    ({"steps": 61}, "steps"),                       # over --max-steps
    ({"cfg_scale": -1}, "cfg_scale"),
    ({"width": 65}, "width"),
    ({"width": 1024, "height": 1536}, "width"),     # over --max-pixels
    ({"batch_size": 3, "n_iter": 3}, "batch_size"),  # over --max-images
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"sampler_name": "DPM++ SDE"}, "sampler_name"),
    ({"scheduler": "exponential"}, "scheduler"),
    ({"enable_hr": True}, "enable_hr"),
    ({"seed": 2**64}, "seed"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "override_settings"),
    ({"prompt": "a red circle <lora:detail:0.8>"}, "prompt"),
])
def test_bad_fields_are_a_422_naming_the_field(server, fields, field):
    response = _txt2img(server, **fields)
    assert response.status_code == 422, response.text
    locations = [e["loc"] for e in response.json()["detail"]]
    assert any(loc[:2] == ["body", field] for loc in locations), locations


def test_messages_say_what_is_allowed(server):
    sampler = _txt2img(server, sampler_name="DPM++ SDE").json()["detail"][0]["msg"]
    assert "Euler a" in sampler and "DPM++ 2M Karras" in sampler
    assert "LoRA support is not available" in _txt2img(server, prompt="<lora:x:1>").json()["detail"][0]["msg"]


def test_size_limits_are_a_413(server):
    assert httpx.post(f"{server.url}/sdapi/v1/img2img", content=b"x" * (2 * 2**20),
                      headers={"content-type": "application/json"}).status_code == 413
    # a picture whose header says 5000x5000 is refused before its pixels are decoded (decompression bomb)
    bomb = PIL.Image.new("L", (5000, 5000))
    response = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": [_b64(bomb)], "steps": 2})
    assert response.status_code == 413 and "5000x5000" in response.text
    assert httpx.post(f"{server.url}/sdapi/v1/img2img",
                      json={"init_images": ["not base64!"], "steps": 2}).status_code == 422


def test_a_failed_batch_is_a_500_and_the_server_keeps_serving(server):
    failed = _txt2img(server, cfg_scale=1e30, steps=2)  # guidance this large overflows to NaN
    assert failed.status_code == 500 and "NaN" in failed.json()["detail"]
    assert _txt2img(server, steps=1).status_code == 200


def test_batching_parity_one_at_a_time_and_concurrently(server):
    requests = [dict(prompt=f"a {color} {shape} on a {bg} background", seed=100 + i, cfg_scale=3.0 + i,
                     steps=2, negative_prompt="" if i % 2 else "a white square")
                for i, (color, shape, bg) in enumerate([
                    ("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "black"),
                    ("blue", "circle", "red"), ("white", "square", "green"), ("black", "triangle", "yellow"),
                    ("red", "square", "white"), ("green", "circle", "black")])]
    alone = [_png(_txt2img(server, **r).json()["images"][0]) for r in requests]
    batches_before = _metric(server, "sdrt_batch_size_images_count")
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _txt2img(server, **r), requests))
    assert all(r.status_code == 200 for r in together)
    assert _metric(server, "sdrt_batch_size_images_count") - batches_before < len(requests)  # they did batch
    for i, response in enumerate(together):
        assert np.array_equal(_png(response.json()["images"][0]), alone[i]), f"request {i}"


def test_unknown_fields_are_ignored_and_info_lists_the_seeds(server):
    response = _txt2img(server, steps=1, batch_size=2, n_iter=2, seed=7, hr_scale=2, some_new_field={"x": 1})
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and len(response.json()["images"]) == 4


def test_model_listing_and_options(server):
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny-sd" and "/" not in models[0]["filename"]  # no server path
    assert httpx.get(f"{server.url}/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd"
    assert httpx.get(f"{server.url}/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert _txt2img(server, steps=1, override_settings={"sd_model_checkpoint": "tiny-sd"}).status_code == 200


# ----------------------------------------------------------------------------------------------- OpenAI
def test_openai_client_generates(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 2})
    images = [_png(d.b64_json) for d in result.data]
    assert [im.shape for im in images] == [(64, 64, 3)] * 2 and not np.array_equal(images[0], images[1])
    again = client.images.generate(prompt=PROMPT, n=1, size="64x64", extra_body={"seed": 6, "steps": 2})
    assert np.array_equal(_png(again.data[0].b64_json), images[1])
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(prompt=PROMPT, size="60x64")
    assert "size" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt=PROMPT, response_format="url")


def test_metrics_in_prometheus_text(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("sdrt_queue_depth", "sdrt_batch_size_images_bucket", "sdrt_request_latency_seconds_bucket",
                 "sdrt_images_total", 'sdrt_errors_total{kind="invalid"}'):
        assert name in text
    assert _metric(server, "sdrt_images_total") > 0
    assert _metric(server, 'sdrt_errors_total{kind="invalid"}') >= 1


# -------------------------------------------------------------------------------- auth, queue, timeouts
def test_api_key_guards_every_endpoint_but_health(guarded):
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    for path in ("/sdapi/v1/samplers", "/sdapi/v1/options", "/metrics", "/docs"):
        response = httpx.get(f"{guarded.url}{path}")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
        assert httpx.get(f"{guarded.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{guarded.url}{path}", headers=bearer).status_code == 200, path
    assert _txt2img(guarded).status_code == 401
    api = webuiapi.WebUIApi(host="127.0.0.1", port=guarded.port, steps=1)
    api.session.headers["Authorization"] = f"Bearer {KEY}"
    assert api.txt2img(prompt=PROMPT, seed=1, width=64, height=64).image.size == (64, 64)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt=PROMPT)
    good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    assert len(good.images.generate(prompt=PROMPT, extra_body={"steps": 1}).data) == 1


def test_full_queue_is_a_503_with_retry_after_and_a_disconnect_is_dropped(guarded, step_seconds):
    bearer = {"Authorization": f"Bearer {KEY}"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(_txt2img, guarded, steps=_slow(step_seconds, 6), headers=bearer, timeout=600)
        _wait_until(lambda: _running(guarded, bearer))
        queued = pool.submit(_txt2img, guarded, steps=1, seed=2, headers=bearer, timeout=600)
        leaving = _raw_post(guarded, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1, "seed": 3}, bearer)
        _wait_until(lambda: _metric(guarded, "sdrt_queue_depth", bearer) == 2)
        full = _txt2img(guarded, steps=1, headers=bearer)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        leaving.close()  # the client goes away before its turn: the queue drops it
        _wait_until(lambda: _metric(guarded, 'sdrt_errors_total{kind="disconnected"}', bearer) == 1)
        assert _metric(guarded, "sdrt_queue_depth", bearer) == 1
        images_before = _metric(guarded, "sdrt_images_total", bearer)
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert _metric(guarded, "sdrt_images_total", bearer) - images_before == 2  # never the dropped one's
    assert _metric(guarded, 'sdrt_errors_total{kind="queue_full"}', bearer) == 1


def test_a_request_over_the_timeout_is_a_504_and_sigterm_drains_with_exit_0(step_seconds):
    with ServerProcess(["--max-batch", "1", "--max-steps", "1000", "--timeout", "3"]) as server:
        start = time.monotonic()
        response = _txt2img(server, steps=_slow(step_seconds, 12))
        assert response.status_code == 504 and time.monotonic() - start < 6, response.text
        assert "timeout" in response.json()["detail"]
        server.terminate()  # the batch of the timed-out request is still running: it finishes first
        assert server.wait() == 0


def test_sigterm_finishes_the_running_batch_answers_the_queue_with_503_and_exits_0(step_seconds):
    with ServerProcess(["--max-batch", "1", "--max-steps", "1000"]) as server:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = pool.submit(_txt2img, server, steps=_slow(step_seconds, 3), timeout=600)
            _wait_until(lambda: _running(server))
            queued = [pool.submit(_txt2img, server, steps=1, seed=s, timeout=600) for s in (2, 3)]
            _wait_until(lambda: _metric(server, "sdrt_queue_depth") == 2)
            server.terminate()
            assert [q.result().status_code for q in queued] == [503, 503]
            finished = running.result()
        assert finished.status_code == 200 and len(finished.json()["images"]) == 1
        assert server.wait() == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")


def _raw_post(server: ServerProcess, path: str, body: dict, headers: dict) -> socket.socket:
    """A request on a bare socket, left waiting for its answer (close it to disconnect)."""
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall("\r\n".join(lines).encode() + data)
    return sock


def _wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_importing_sdrt_imports_no_server_package():
    code = "import sys, sdrt; sdrt.load; print(any(m in sys.modules for m in ('fastapi', 'uvicorn', 'starlette')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


@pytest.mark.parametrize("args, words", [
    (["--api-key-env", "SDRT_TEST_UNSET_VARIABLE"], ["SDRT_TEST_UNSET_VARIABLE", "unset or empty"]),
    (["--lora-dir", "/nonexistent/loras"], ["--lora-dir", "not a folder"]),
    (["--port", "70000"], ["--port"]),
    (["--max-batch", "0"], ["--max-batch"]),
    (["--model", "/nonexistent/model"], ["/nonexistent/model"]),
    (["--max-steps", "5000"], ["--max-steps 5000", "at most 1000 steps"]),
])
def test_bad_serve_arguments_exit_2_with_one_line(args, words):
    env = {k: v for k, v in os.environ.items() if k != "SDRT_TEST_UNSET_VARIABLE"}
    done = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and all(w in done.stderr for w in words), done.stderr
