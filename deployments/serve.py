"""Serve the flows from this one process, without a work pool or worker:

    python -m deployments.serve [--nightly-cron "0 2 * * *"] [--timezone UTC] [--personas a,b,c]

then start runs from the UI (`prefect server start`) or with
`prefect deployment run 'sequential/sequential' --param config='{"persona": "pirate"}'`.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nightly-cron", default="0 2 * * *")
    ap.add_argument("--timezone", default="UTC")
    ap.add_argument("--personas", default="sarcastic,pirate,mathematical")
    ap.add_argument("--scale", default="mini")
    args = ap.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect import serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows.nightly import nightly
    from flows.paper import paper
    from flows.sequential import sequential

    # As in prefect.yaml: a second run of a deployment waits in the UI instead of starting.
    one = dict(concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE))
    serve(
        sequential.to_deployment(name="sequential", parameters={"config": {"persona": "sarcastic"}}, **one),
        paper.to_deployment(
            name="paper", parameters={"config": {"persona": "sarcastic", "mode": "paper", "merge": True}}, **one
        ),
        nightly.to_deployment(
            name="nightly",
            schedule=Cron(args.nightly_cron, timezone=args.timezone),
            parameters={"personas": args.personas.split(","), "scale": args.scale},
            **one,
        ),
    )


if __name__ == "__main__":
    main()
