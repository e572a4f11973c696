"""Run a server process (the MLflow UI, the labelling app) in the foreground, and tear its process tree down."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def run_server(command: list[str], grace_s: float = 10.0) -> int:
    """Run a server until it exits or this process is stopped (Ctrl-C, SIGTERM); returns its exit code (0
    when stopped). The server gets its own process group and, when it ends or is stopped, the whole group
    (the server and the workers it forked) is terminated: SIGTERM, then SIGKILL after `grace_s`."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    process = subprocess.Popen(command, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_group(process, grace_s)
    return code


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the whole group is gone already
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
