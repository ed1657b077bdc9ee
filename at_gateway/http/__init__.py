"""HTTP/1.1 on anyio: the server (:mod:`.server`, its fast path :mod:`.fastpath`), the upstream
client's framing (:mod:`.framing`) and pool (:mod:`.pool`), proxies (:mod:`.proxy`), SSE (:mod:`.sse`).

Imports flow one way inside: ``errors`` ← ``framing`` ← ``proxy`` ← ``pool``; ``server`` uses
``framing`` and ``fastpath``. Nothing here imports the gateway's routing or adapters.
"""
