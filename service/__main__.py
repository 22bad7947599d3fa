"""`python -m service`: load every checkpoint, then serve on HOST:PORT with uvicorn (one process).

A checkpoint that cannot be served stops start-up with a one-line reason and exit code 2.
SIGTERM (or Ctrl-C) drains: /readyz turns 503, new inference requests get 503, in-flight and
queued ones finish, then the process exits 0. A second signal forces the exit.
`python -m service --help` lists the settings (environment variables) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time

import torch
import uvicorn
from pydantic import AliasChoices, ValidationError

from models.checkpoint import CheckpointError

from . import logs
from .app import create_app
from .registry import load_models
from .settings import Settings

ACCEPTED_GRACE_S = 0.25


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain step on the first signal and exit code 0 after it."""

    def __init__(self, config: uvicorn.Config, on_drain, grace_s: float = 0.0) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.grace_s = grace_s
        self._exit_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._exit_at is not None or self.should_exit:
            self.should_exit = self.force_exit = True  # second signal: stop now
            return
        self.on_drain()
        self._exit_at = time.monotonic() + self.grace_s
        if self.grace_s <= 0:
            self.should_exit = True
        # not recorded in _captured_signals: uvicorn would re-raise it and exit with 143

    async def shutdown(self, sockets=None) -> None:
        """Stop listening first, then give connections accepted a moment ago the time to
        deliver their request (it gets its answer: 503, draining) before uvicorn closes every
        connection without a request in progress; closing at once reset some of them under
        load (bench/overload.py)."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(ACCEPTED_GRACE_S)
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


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


def drain_timeout(settings: Settings) -> float:
    """Queued work cannot outlive its deadline: the grace period, one deadline, a margin."""
    return settings.shutdown_grace_s + settings.request_timeout_s + 5.0


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
    logs.configure(settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        loaded = load_models(settings)
    except CheckpointError as e:
        print(f"error: cannot serve: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, models=loaded)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=drain_timeout(settings), lifespan="on")
    server = DrainingServer(config, app.state.service.begin_drain, settings.shutdown_grace_s)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
