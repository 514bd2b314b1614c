"""`sdrt serve`: an HTTP service (AUTOMATIC1111's and OpenAI's image APIs) with dynamic batching.

Needs the `serve` extra (fastapi, uvicorn, prometheus_client); `import sdrt` never imports it.

    jobs.py        GenerationJob (one request's generation, API-neutral), batch_key, split_job
    runner.py      run_batch(pipe, jobs): one pipeline call for jobs that share a batch key
    batcher.py     the bounded queue that groups jobs into batches and feeds one worker
    worker.py      PipelineWorker: the pipeline and the one thread that runs it
    loras.py       <lora:NAME:W> prompt tags and the server's LoRA folder (names, never paths)
    a1111_api.py   AUTOMATIC1111 request/response models and their translation to jobs
    openai_api.py  OpenAI images request/response models and their translation to jobs
    codec.py       base64 images in (size-checked before decoding) and PNGs out
    metrics.py     Prometheus metrics
    middleware.py  bearer-token auth and the request body limit
    app.py         create_app(...): the FastAPI application
    server.py      uvicorn with a drain on SIGTERM
    ray_batching.py   `sdrt serve --ray`: one replica's service, Ray's @serve.batch grouped by batch_key
    ray_deployment.py `sdrt serve --ray`: the Ray Serve deployment (@serve.ingress of create_app's app)
"""
