"""`megatron-vita serve`: an OpenAI-compatible HTTP server (FastAPI / Starlette under uvicorn)
over any `inference.api.Generator` — the HF path or the megatron-core engine.

- settings.py  limits and media policy (`ServeSettings`), `ApiError` in OpenAI's error shape
- media.py     content-part URLs -> checked local files (data:, --media-root, remote)
- openai_protocol.py  chat-completions bodies <-> GenerationRequest / answers and chunks
- legacy.py    the original Long-VITA server's `PUT /api`
- scheduler.py the FIFO queue and the worker thread that owns the Generator
- app.py       routes, body limit, server-sent events
- cli.py       the command line and the uvicorn run
"""
