"""The OpenAI-compatible HTTP server over the engine.

- :mod:`~inference.serve.server`: routes, auth, limits, overload (429), streaming, drain on Ctrl-C / SIGTERM.
- :mod:`~inference.serve.openapi`: the server's OpenAPI schema (GET /openapi.json).

May import ``inference.engine`` (what it serves), ``inference.harmony``, ``inference.errors`` and the standard
library.
"""
