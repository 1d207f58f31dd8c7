"""``python -m finetune ui``: the MLflow UI on the store our runs use, bound to 127.0.0.1 unless told otherwise.

It runs MLflow's own server (``python -m mlflow ui``) as a child process, on the same store resolution as training
(``--uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory), and refuses a
sqlite store that does not exist rather than creating an empty one somewhere unexpected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from inference.errors import UserError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def command(uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> tuple[list[str], str]:
    """The server command line and the store it will show."""
    from finetune.track import tracking
    store = tracking.tracking_uri(uri)
    try:
        tracking.check_store(store)
    except tracking.StoreError as exc:
        raise UserError(str(exc)) from None
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    # One worker: a UI for one person on this machine; MLflow's default of 4 processes quadruples start-up work.
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host,
            "--port", str(port), "--workers", "1"], store


def serve(uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Run the UI until Ctrl-C (or the server exits)."""
    argv, store = command(uri, host, port)
    if host not in LOOPBACK:
        print(f"warning: binding {host}: the MLflow UI has no authentication, so anyone who can reach "
              f"{host}:{port} can read and change these runs", file=sys.stderr)
    print(f"MLflow UI on http://{host if ':' not in host else f'[{host}]'}:{port}  (store: {store}; Ctrl-C stops it)",
          flush=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's server otherwise starts ~7 background job-runner processes (GenAI evaluation jobs and periodic
    # tasks) that browsing runs never uses; on a small machine they double the start-up time.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Its own process group: MLflow's server runs its web workers as child processes, and stopping only the
    # parent would leave a worker holding the port. Ctrl-C and SIGTERM reach us and are passed on to the group.
    server = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        _stop_group(server)
        raise
    if code != 0:
        raise UserError(f"the MLflow server exited with status {code} (is port {port} in use? try --port)")


def _stop_group(server: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after ``timeout`` seconds."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)   # workers that outlived their parent (or ignored SIGTERM)
    server.wait()
