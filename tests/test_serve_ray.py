"""`sdrt serve --ray` as a real process: a real local Ray (started by the command, 2 replicas of 1 CPU each,
the bundled tiny model), driven over HTTP through Ray's proxy by the clients the `sdrt serve` tests use
(`webuiapi`, `openai`, raw httpx), and compared with a plain `sdrt serve` on the same requests.

One Ray session for the module (the `ray_server` fixture); the last test stops it with SIGTERM.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import PIL.Image
import pytest
import webuiapi
import openai

from sdrt.bench.serve_process import ServerProcess
from sdrt.serve.ray_deployment import REPLICA_HEADER, REPLICA_PID_HEADER

PROMPT = "a red circle on a blue background"
LIMITS = ["--max-steps", "60", "--max-images", "8", "--max-body-mb", "1"]


def _png(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _txt2img(server: ServerProcess, timeout: float = 120, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, "sampler_name": "Euler a", **fields}
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=timeout)


@pytest.fixture(scope="module")
def ray_server():
    with ServerProcess(["--ray", "--replicas", "2", "--max-batch", "4", "--batch-wait-ms", "200", *LIMITS],
                       ready_timeout=240) as process:
        yield process


@pytest.fixture(scope="module")
def plain_server():
    with ServerProcess(["--max-batch", "4", "--batch-wait-ms", "200", *LIMITS]) as process:
        yield process


def _replicas_seen(server: ServerProcess, requests: int = 8) -> set[str]:
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(lambda s: _txt2img(server, seed=s, steps=4), range(requests)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return {a.headers[REPLICA_HEADER] for a in answers}


def test_answers_equal_sdrt_serve_and_both_replicas_serve(ray_server, plain_server):
    pictures = {}
    for name, server in (("ray", ray_server), ("plain", plain_server)):
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2)
        batch = api.txt2img(prompt=PROMPT, negative_prompt="a green square", seed=41, cfg_scale=5.5,
                            width=64, height=64, batch_size=2)
        picture = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        varied = api.img2img(images=[picture], prompt=PROMPT, denoising_strength=0.5, seed=3, width=64, height=64)
        assert batch.info["all_seeds"] == [41, 42]
        pictures[name] = [np.asarray(im) for im in (*batch.images, varied.image)]
    for ray_image, plain_image in zip(pictures["ray"], pictures["plain"]):
        assert np.array_equal(ray_image, plain_image)
    assert len(_replicas_seen(ray_server)) == 2


def test_concurrent_requests_batch_per_replica_and_keep_their_pictures(ray_server):
    requests = [dict(seed=100 + i, cfg_scale=3.0 + i, steps=2, width=64 if i % 3 else 32, height=64)
                for i in range(8)]  # two sizes: never one forward pass
    alone = [_png(_txt2img(ray_server, **r).json()["images"][0]) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _txt2img(ray_server, **r), requests))
    for i, response in enumerate(together):
        assert response.status_code == 200, response.text
        assert np.array_equal(_png(response.json()["images"][0]), alone[i]), f"request {i}"
    batches = sum(float(line.split()[-1]) for line in httpx.get(f"{ray_server.url}/metrics").text.splitlines()
                  if line.startswith("sdrt_batch_size_images_count"))
    assert batches > 0  # this replica's own metrics


@pytest.mark.parametrize("path, body", [
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 61}),
    ("/sdapi/v1/txt2img", {"prompt": PROMPT, "sampler_name": "DPM++ SDE"}),
    ("/sdapi/v1/txt2img", {"prompt": "a red circle <lora:detail:0.8>"}),
    ("/sdapi/v1/img2img", {"init_images": ["not base64!"], "steps": 2}),
    ("/v1/images/generations", {"prompt": PROMPT, "size": "60x64"}),
    ("/v1/images/generations", {"prompt": PROMPT, "n": 9}),
])
def test_bad_input_gets_the_same_answer_as_sdrt_serve(ray_server, plain_server, path, body):
    ray_answer = httpx.post(f"{ray_server.url}{path}", json=body, timeout=60)
    plain_answer = httpx.post(f"{plain_server.url}{path}", json=body, timeout=60)
    assert ray_answer.status_code == plain_answer.status_code and ray_answer.status_code in (413, 422)
    assert ray_answer.json() == plain_answer.json()


def test_size_limit_and_failed_batch_as_sdrt_serve(ray_server):
    assert httpx.post(f"{ray_server.url}/sdapi/v1/img2img", content=b"x" * (2 * 2**20),
                      headers={"content-type": "application/json"}).status_code == 413
    failed = _txt2img(ray_server, cfg_scale=1e30)  # guidance this large overflows to NaN
    assert failed.status_code == 500 and "NaN" in failed.json()["detail"]
    assert _txt2img(ray_server, steps=1).status_code == 200


def test_openai_client_generates(ray_server):
    client = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 2})
    again = client.images.generate(prompt=PROMPT, n=1, size="64x64", extra_body={"seed": 6, "steps": 2})
    assert np.array_equal(_png(again.data[0].b64_json), _png(result.data[1].b64_json))
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt=PROMPT, size="60x64")


def test_a_replica_killed_under_load_every_request_is_answered_and_ray_brings_it_back(ray_server):
    before = {}
    while len(before) < 2:  # the replicas' ids and processes
        answer = httpx.get(f"{ray_server.url}/health")
        before[answer.headers[REPLICA_HEADER]] = int(answer.headers[REPLICA_PID_HEADER])
    victim, pid = sorted(before.items())[0]

    def one(seed: int) -> str:
        try:
            return str(_txt2img(ray_server, seed=seed, steps=30, timeout=180).status_code)
        except httpx.TimeoutException:
            return "hung"
        except httpx.HTTPError as e:
            return f"lost ({type(e).__name__})"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = [pool.submit(one, seed) for seed in range(8)]
        time.sleep(1.5)  # the requests are spread over both replicas and running
        os.kill(pid, signal.SIGKILL)  # a replica process this test's server started
        outcomes = [o.result() for o in outcomes]
    assert all(o == "200" or o.startswith("5") for o in outcomes), outcomes
    assert "200" in outcomes

    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        live = _replicas_seen(ray_server, requests=4) if ray_server.health() == "ready" else set()
        if len(live) == 2 and victim not in live:
            break
        time.sleep(1)
    else:
        raise AssertionError("Ray did not bring a second replica back")


def test_sigterm_stops_ray_and_exits_0(ray_server):
    ray_server.terminate()
    assert ray_server.wait(timeout=120) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{ray_server.url}/health")


# ------------------------------------------------------------------------------ no Ray session needed
def test_importing_sdrt_and_its_cli_never_imports_ray():
    code = ("import sys, sdrt, sdrt.cli, sdrt.cli.serve, sdrt.serve.app; sdrt.cli.build_parser(); "
            "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


@pytest.mark.parametrize("args, words", [
    (["--replicas", "2"], ["--replicas", "need --ray"]),
    (["--ray", "--autoscale", "3:1"], ["--autoscale", "MIN:MAX"]),
    (["--ray", "--replicas", "0"], ["--replicas", ">= 1"]),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], ["not allowed with"]),
    (["--ray", "--model", "/nonexistent/model"], ["/nonexistent/model"]),
])
def test_bad_ray_arguments_exit_2_with_one_line(args, words):
    done = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and all(w in done.stderr for w in words), done.stderr
