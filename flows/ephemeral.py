"""Starting Prefect's ephemeral API early, while the CLI loads the model libraries.

With no PREFECT_API_URL, the first flow run of a process starts a temporary API server in a
subprocess and waits for it: about 10 s on a 2-core machine, most of a smoke build's overhead.
Started on a thread before torch and transformers are imported, that wait overlaps the imports
the stages need anyway. Prefect reuses the same server (one instance per process); if anything
here is unavailable the flow simply starts the server itself, as before.
"""

from __future__ import annotations

import threading
from typing import Callable


def start_ephemeral_api_early() -> Callable[[], None]:
    """Begin starting the ephemeral API if this process will need one; returns `wait()`."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
    except ImportError:  # a Prefect without this internal: let the flow start it
        return lambda: None
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    server = SubprocessASGIServer()  # the instance Prefect's client looks up
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            failure.append(e)

    thread = threading.Thread(target=start, name="prefect-ephemeral-api", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait
