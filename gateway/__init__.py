"""The async HTTP gateway: OpenAI + native API in front of prefill/decode pools.

`gateway.app.create_app(settings)` builds the ASGI app; `gateway.server.run(settings)` serves it.
It imports only `api` (never engine, prefill or decode): nodes are reached over HTTP.
"""
