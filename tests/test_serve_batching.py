"""The serve package's pure parts, without a server: batch keys, job pieces, LoRA tags and LoRA syncing,
and the batcher's grouping (its worker here records the batches it is given instead of generating)."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from sdrt.errors import InvalidInputError
from sdrt.serve.batcher import Batcher, GenerationFailed, QueueFull, ShuttingDown
from sdrt.serve.jobs import GenerationJob, batch_key, split_job
from sdrt.serve.loras import LoraLibrary, parse_lora_tags

JOB = GenerationJob(mode="txt2img", prompt="a red circle", negative_prompt="", seeds=(1,), guidance_scale=7.0,
                    steps=20, scheduler="euler_a", eta=0.0, width=64, height=64)


def job(**changes) -> GenerationJob:
    return dataclasses.replace(JOB, **changes)


def test_batch_key_shares_only_what_one_call_can():
    assert batch_key(job(seeds=(5, 6), guidance_scale=3.0, prompt="x", negative_prompt="y")) == batch_key(JOB)
    for other in (job(steps=21), job(width=72), job(scheduler="ddim"), job(eta=0.5), job(guidance_scale=1.0),
                  job(loras=(("detail", 0.5),)), job(mode="img2img", strength=0.5, image_digest="a")):
        assert batch_key(other) != batch_key(JOB), other
    picture = job(mode="img2img", strength=0.5, image_digest="a")
    assert batch_key(dataclasses.replace(picture, seeds=(9,))) == batch_key(picture)
    assert batch_key(dataclasses.replace(picture, image_digest="b")) != batch_key(picture)
    assert batch_key(job(mode="inpaint", strength=1.0)) is None  # inpainting runs alone


def test_split_job_keeps_seeds_in_order():
    pieces = split_job(job(seeds=tuple(range(10))), 4)
    assert [p.seeds for p in pieces] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [p.seeds for p in split_job(job(mode="inpaint", seeds=(1, 2)), 4)] == [(1,), (2,)]


def test_lora_tags_leave_the_prompt_and_name_their_weights():
    assert parse_lora_tags("a cat <lora:fluffy:0.6>, <lora:detail>") == ("a cat , ", (("detail", 1.0), ("fluffy", 0.6)))
    for bad in ("<lora:>", "<lora:a:b>", "<lora:a:1:2>", "<lora:a:1> <lora:a:2>", "<lora:a:inf>"):
        with pytest.raises(InvalidInputError):
            parse_lora_tags(bad)


class _LoraPipe:
    """The pipeline's LoRA API as the LoRA branch defines it, recording its calls."""

    def __init__(self):
        self.loras, self.calls = {}, []

    def load_lora(self, path, scale=1.0, name=None):
        self.loras[name] = scale
        self.calls.append(("load", name, scale))
        return name

    def set_lora_scale(self, name, scale):
        self.loras[name] = scale
        self.calls.append(("scale", name, scale))

    def unload_lora(self, name=None):
        del self.loras[name]
        self.calls.append(("unload", name))


def test_lora_library_names_files_and_syncs_the_fused_set(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("detail.safetensors", "sub/fluffy.safetensors", "evil.ckpt"):
        (tmp_path / name).write_bytes(b"")
    library = LoraLibrary(tmp_path, available=True)
    assert sorted(library.files) == ["detail", "fluffy"]  # pickled files are never served
    library.check((("detail", 1.0),))
    with pytest.raises(InvalidInputError, match="unknown LoRA name 'evil'"):
        library.check((("evil", 1.0),))
    with pytest.raises(InvalidInputError, match="not available"):
        LoraLibrary(tmp_path, available=False).check((("detail", 1.0),))
    pipe = _LoraPipe()
    library.sync(pipe, (("detail", 1.0), ("fluffy", 0.5)))
    library.sync(pipe, (("fluffy", 0.7),))
    library.sync(pipe, (("fluffy", 0.7),))
    library.sync(pipe, ())
    assert pipe.calls == [("load", "detail", 1.0), ("load", "fluffy", 0.5), ("unload", "detail"),
                          ("scale", "fluffy", 0.7), ("unload", "fluffy")]


class _Recorder:
    def __init__(self, fail_on: int = -1, delay: float = 0.05):
        self.batches, self.fail_on, self.delay = [], fail_on, delay

    async def __call__(self, jobs):
        self.batches.append([j.seeds for j in jobs])
        await asyncio.sleep(self.delay)
        if len(self.batches) - 1 == self.fail_on:
            raise RuntimeError("boom")
        return [[f"image-{s}" for s in j.seeds] for j in jobs]


def _run(coro):
    return asyncio.run(coro)


def test_batcher_groups_compatible_jobs_in_queue_order():
    async def scenario():
        run = _Recorder()
        batcher = Batcher(run, max_batch=4, batch_wait_s=0.2, max_queue=16)
        batcher.start()
        jobs = [job(seeds=(1,)), job(seeds=(2,), steps=30), job(seeds=(3, 4)), job(seeds=(5,)), job(seeds=(6,))]
        results = await asyncio.gather(*(batcher.generate(j) for j in jobs))
        batcher.begin_shutdown()
        await batcher.wait_closed()
        return run.batches, results

    batches, results = _run(scenario())
    assert batches == [[(1,), (3, 4), (5,)], [(2,)], [(6,)]]  # 4 images at most; the other key waits its turn
    assert results[2] == ["image-3", "image-4"]


def test_batcher_refuses_over_the_queue_fails_a_batch_and_drains():
    async def scenario():
        run = _Recorder(fail_on=0, delay=0.2)
        batcher = Batcher(run, max_batch=1, batch_wait_s=0.0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.generate(job(seeds=(1,))))
        await asyncio.sleep(0.05)  # running
        queued = [asyncio.ensure_future(batcher.generate(job(seeds=(s,)))) for s in (2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.generate(job(seeds=(4,)))
        queued[0].cancel()  # a client that leaves before its turn is dropped
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 1
        with pytest.raises(GenerationFailed, match="boom"):
            await first
        assert await queued[1] == ["image-3"]
        slow = asyncio.ensure_future(batcher.generate(job(seeds=(7,))))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.generate(job(seeds=(8,))))
        await asyncio.sleep(0)
        batcher.begin_shutdown()
        with pytest.raises(ShuttingDown):
            await waiting
        assert await slow == ["image-7"]  # the running batch finishes
        await batcher.wait_closed()
        return run.batches

    assert _run(scenario()) == [[(1,)], [(3,)], [(7,)]]
