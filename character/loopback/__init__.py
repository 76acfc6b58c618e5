"""A loopback Tinker service: an HTTP server on 127.0.0.1 that answers the API the installed `tinker`
SDK calls, computing with the local backend on the embedded `tiny` model.

The real `tinker.ServiceClient(base_url=...)` reaches it with any `tml-` key, so tests run the SDK's
own machinery (sessions, heartbeats, ordered training requests, future polling, its retries), and a
user can rehearse a Tinker build offline (`character tinker loopback`). Faults are injected at the
wire by rate and seed (`faults`), state lives on disk so a restart keeps every saved checkpoint
(`registry`), the models and requests run in `engine`, the HTTP side is `server`, the protobuf
bodies `wire`, and `hub` puts the model's tokenizer where the SDK looks for it.

Nothing here imports Prefect; the core does not import this package.
"""
