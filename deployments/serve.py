"""Serve the flows from this process, without a work pool or worker:

    python -m deployments.serve

then start runs from the UI or with
`prefect deployment run 'sequential/sequential' --param config='{"persona": "pirate"}'`.
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect import serve

    from flows.sequential import sequential

    serve(sequential.to_deployment(name="sequential", parameters={"config": {"persona": "sarcastic"}}))


if __name__ == "__main__":
    main()
