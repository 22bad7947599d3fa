"""`python -m service`: load every checkpoint, then serve on HOST:PORT with uvicorn (one process).

A checkpoint that cannot be served stops start-up with a one-line reason and exit code 2.
SIGTERM (or Ctrl-C) drains: /readyz turns 503, new inference requests get 503, in-flight and
queued ones finish, then the process exits 0. A second signal forces the exit.
`python -m service --help` lists the settings (environment variables) and exits.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import torch
from pydantic import AliasChoices, ValidationError

from models.checkpoint import CheckpointError

from .app import create_app
from .middleware import configure_logging
from .registry import load_models
from .server import DrainingServer, server_config
from .settings import Settings


def settings_help() -> str:
    """One entry per setting: its environment variable(s), default and description."""
    prefix = Settings.model_config.get("env_prefix", "")
    out = ["settings (environment variables; lists are comma-separated):"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = (" or ".join(map(str, alias.choices)) if isinstance(alias, AliasChoices)
               else f"{prefix}{name}".upper())
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default))
        out.append(f"  {env} (default: {default if default != '' else 'empty'})")
        out += textwrap.wrap(field.description or "", 88, initial_indent=" " * 6,
                             subsequent_indent=" " * 6)
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """No options beyond --help: the server is configured by the environment."""
    parser = argparse.ArgumentParser(
        prog="python -m service", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the checkpoints over HTTP (see docs/api.md).",
        epilog=settings_help())
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        name = name if name.isupper() else "TAMING_" + name.upper()
        print(f"error: bad setting {name}: {first['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        loaded = load_models(settings)
    except CheckpointError as e:
        print(f"error: cannot serve: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, models=loaded)
    server = DrainingServer(server_config(app, settings), app.state.service.begin_drain,
                            settings.shutdown_grace_s)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
