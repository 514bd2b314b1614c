"""The FastAPI application: `create_app(service, settings)`.

The app only translates HTTP to `GenerationJob`s and back; `service` runs them (`Batcher` over a
`PipelineWorker` in `sdrt serve`; any object with the same methods elsewhere, e.g. a Ray Serve deployment
batching with `batch_key`/`run_batch`). Status codes: 401 without the API key, 413 over a size limit,
422 a bad field (named), 503 queue full (with Retry-After) or shutting down, 504 over the timeout, 500 the
batch the request ran in failed. A client that disconnects before its turn is dropped from the queue.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Optional, Protocol, Sequence

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from sdrt import __version__
from sdrt.serve import a1111_api as a1111
from sdrt.serve import openai_api
from sdrt.serve.batcher import GenerationFailed, QueueFull, ShuttingDown
from sdrt.serve.codec import encode_png_base64
from sdrt.serve.jobs import GenerationJob
from sdrt.serve.metrics import ServeMetrics
from sdrt.serve.middleware import OPENAI_PREFIX, BearerAuth, BodyLimit, Latency, error_payload
from sdrt.serve.rejections import Rejected
from sdrt.serve.settings import ServeSettings


GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations")
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it


class GenerationService(Protocol):
    closing: bool

    @property
    def queue_depth(self) -> int: ...
    def start(self) -> None: ...
    def begin_shutdown(self) -> None: ...
    async def wait_closed(self) -> None: ...
    async def generate(self, job: GenerationJob) -> list[PIL.Image.Image]: ...


class _Failure(Exception):
    """An answer other than 200, with the metrics kind it counts as."""

    def __init__(self, status: int, message: str, kind: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def create_app(service: GenerationService, settings: ServeSettings,
               metrics: Optional[ServeMetrics] = None) -> FastAPI:
    metrics = metrics or ServeMetrics(max_batch=16)
    metrics.track_queue(lambda: service.queue_depth)
    model = settings.model

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.begin_shutdown()
        await service.wait_closed()

    app = FastAPI(title="sdrt serve", version=__version__, lifespan=lifespan)

    async def generate(request: Request, job: GenerationJob) -> list[PIL.Image.Image]:
        """The job's images; raises _Failure for every other outcome."""
        task = asyncio.ensure_future(service.generate(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=settings.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task not in done:
            task.cancel()
            if gone in done:
                raise _Failure(CLIENT_CLOSED, "the client disconnected", "disconnected")
            raise _Failure(504, f"no answer within the server's timeout of {settings.timeout_s} s", "timeout")
        try:
            images = task.result()
        except QueueFull as e:
            raise _Failure(503, str(e), "queue_full", {"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            raise _Failure(503, str(e), "shutting_down", {"Retry-After": "5"}) from None
        except GenerationFailed as e:
            raise _Failure(500, f"generation failed: {e}", "internal") from None
        metrics.images.inc(len(images))
        return images

    async def translate(convert, body, in_thread: bool = False):
        try:
            return await asyncio.to_thread(convert, body, settings) if in_thread else convert(body, settings)
        except Rejected as e:
            metrics.error(e.kind)
            raise

    async def a1111_answer(request: Request, body: a1111._Generation, translated: a1111.Translated) -> dict:
        images = await generate(request, translated.job)
        hashes = await asyncio.to_thread(model.loras.hash_list, translated.job.loras)
        texts = [a1111.infotext(translated, seed, model.name, hashes) for seed in translated.job.seeds]
        encoded = await asyncio.to_thread(lambda: [encode_png_base64(i, t) for i, t in zip(images, texts)]) \
            if body.send_images is not False else []
        return {"images": encoded, "parameters": a1111.echoed_parameters(body),
                "info": a1111.info_json(translated, body, model.name, model.inpainting, hashes)}

    @app.post("/sdapi/v1/txt2img", response_model=a1111.GenerationResponse)
    async def txt2img(body: a1111.Txt2ImgRequest, request: Request):
        return await a1111_answer(request, body, await translate(a1111.txt2img_job, body))

    @app.post("/sdapi/v1/img2img", response_model=a1111.GenerationResponse)
    async def img2img(body: a1111.Img2ImgRequest, request: Request):
        return await a1111_answer(request, body, await translate(a1111.img2img_job, body, in_thread=True))

    @app.post("/v1/images/generations")
    async def images_generations(body: openai_api.ImageGenerationRequest, request: Request):
        job = await translate(openai_api.generation_job, body)
        images = await generate(request, job)
        encoded = await asyncio.to_thread(lambda: [encode_png_base64(image) for image in images])
        return openai_api.images_response(job, encoded)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": name, "aliases": list(aliases), "options": {}} for name, (_, aliases) in a1111.SAMPLERS.items()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": model.name, "model_name": model.name, "hash": None, "sha256": None,
                 "filename": model.name, "config": None}]

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": model.name, "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
                "eta_ancestral": 1.0, "samples_format": "png", "enable_pnginfo": True}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name} for name in sorted(model.loras.files)]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "sdrt"}]}

    @app.get("/health")
    async def health():
        status = "draining" if service.closing else "ready"
        return JSONResponse({"status": status, "model": model.name, "queue_depth": service.queue_depth},
                            status_code=503 if service.closing else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    _add_error_handlers(app, metrics)
    app.add_middleware(Latency, observe=lambda path, s: metrics.latency.labels(path).observe(s),
                       paths=GENERATION_PATHS)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes, on_reject=lambda: metrics.error("too_large"))
    app.add_middleware(BearerAuth, api_key=settings.api_key, on_reject=lambda: metrics.error("unauthorized"))
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by then, so receive() waits for the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _field_errors(path: str, errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not path.startswith(OPENAI_PREFIX):
        return {"detail": jsonable_encoder(errors)}
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errors)
    return openai_api.error_body(message, param=field)


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.error("invalid")
        return JSONResponse(_field_errors(request.url.path, exc.errors()), status_code=422)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Rejected):
        if exc.status != 422:
            return JSONResponse(error_payload(request.url.path, exc.status, str(exc)), status_code=exc.status)
        error = {"type": "value_error", "loc": ["body", *(exc.field.split(".") if exc.field else [])],
                 "msg": exc.message, "input": exc.value}
        return JSONResponse(_field_errors(request.url.path, [error]), status_code=422)

    @app.exception_handler(_Failure)
    async def failure(request: Request, exc: _Failure):
        metrics.error(exc.kind)
        return JSONResponse(error_payload(request.url.path, exc.status, exc.message), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_payload(request.url.path, exc.status_code, str(exc.detail)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))
