"""The caption API: ``POST /v1/captions``, the OpenAI-compatible ``POST /v1/chat/completions`` and
``GET /v1/models``, served by uvicorn next to the stream worker (``captionfleet worker`` with
``WORKER_HTTP__ENABLED``), next to a bulk job while it runs (``worker.bulk_api``, same setting) or alone
(``captionfleet serve``).

One module per concern:

- ``items``: an API image on its way to the model (a ``pipeline.Item`` with a future for its answer), and
  ``Lane``, what the API needs of the model side: take images, answer each one's future;
- ``inputs``: request bodies (multipart, JSON with uris or base64) -> images, uris checked by the
  allow-list before any I/O, decoding overrides capped;
- ``openai_chat``: the chat-completions subset, mapped onto the same images and answers;
- ``guard``: what is refused before a request is parsed: auth, draining or starting, concurrency, body size;
- ``answers``: results as JSON, in request order; error bodies;
- ``app``: the FastAPI routes, deadlines and disconnects;
- ``server``: uvicorn in its own thread, and the SIGTERM drain.

Threads: uvicorn's event loop runs the routes; fetches of uris run in its worker threads (the Fetcher
bounds them); the model thread answers each image's future, which the route awaits.

Nothing in the shared engine imports this package (the layer contract in pyproject.toml).
"""
