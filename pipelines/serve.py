"""REST serving: a registered model behind MLflow's scoring server.

In: a model URI (default ``models:/<model_name>@champion``), host and port. Out: a running
``mlflow models serve`` process with the standard ``/ping`` and ``/invocations`` endpoints,
until it is stopped; then a small summary. Requests carry images as base64 in a binary
``image`` column::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG/JPEG file>"]]}}

and get one prediction per image (``predicted_label``, ``probability``, ``probabilities``,
``error``). Bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.registry import resolve_model_uri

log = logging.getLogger(__name__)


def serve_command(
    config: Config, model: str | None, host: str, port: int
) -> tuple[list[str], dict[str, str], str]:
    """The server's command line and environment, and the resolved model URI."""
    resolved = resolve_model_uri(
        model or config.score.model,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=config.tracking_uri,
    )
    command = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "--model-uri", resolved.uri,
        "--env-manager", "local",  # this environment already has every dependency
        "--host", host,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = config.tracking_uri
    # The server starts uvicorn by name: the venv's bin must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return command, env, resolved.uri


def serve(config: Config, model: str | None, host: str, port: int) -> dict[str, Any]:
    """Serve until interrupted (Ctrl-C); fail with a one-line error if the server fails."""
    command, env, uri = serve_command(config, model, host, port)
    log.info("serve: %s at http://%s:%d/invocations (Ctrl-C stops)", uri, host, port)
    try:
        code = subprocess.run(command, env=env, check=False).returncode
    except KeyboardInterrupt:
        code = 0
    if code not in (0, -2, 130):
        raise UserError(f"the scoring server for {uri} exited with status {code} (see above)")
    return {"model_uri": uri, "url": f"http://{host}:{port}", "stopped": True}
