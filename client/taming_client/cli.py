"""`taming`: generate, encode, decode and list models from the command line.

    taming generate --label 7 -n 4 --seed 1 -o sevens.png
    taming encode a.png b.png -o tokens.json
    taming decode tokens.json -o out.png
    taming models

Every command takes --url (default $TAMING_URL, else http://localhost:8000) and --api-key
(default $TAMING_API_KEY). A server error prints its message and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__
from .client import DEFAULT_URL, TamingClient
from .protocol import GenerateParams
from .terminal import RowPainter
from .types import Generation, RowEvent, TamingError, tile


def _label(text: str) -> int | str:
    """A class index ("7") or a class name ("Sneaker")."""
    try:
        return int(text)
    except ValueError:
        return text


def _grid(text: str) -> list[int]:
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, e.g. 7x14, not {text!r}")
    return [int(p) for p in parts]


def _connection(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--url", default=os.environ.get("TAMING_URL") or DEFAULT_URL,
                   help="server address (default: $TAMING_URL, else %(default)s)")
    g.add_argument("--api-key", default=os.environ.get("TAMING_API_KEY") or None,
                   help="bearer token for servers that need one (default: $TAMING_API_KEY)")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for an answer (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taming", description=(
        "Generate, encode and decode images with a taming-server."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="sample images", description=(
        "Sample images from a model; options left out take the model's defaults."))
    gen.add_argument("--model", help="model name (default: the server's default model)")
    gen.add_argument("--label", type=_label, help="class index or name (default: unconditional)")
    gen.add_argument("-n", type=int, default=1, help="number of images (default: 1)")
    gen.add_argument("--seed", type=int, help="seed of image 0; image i uses seed + i")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--cfg-scale", type=float, help="classifier-free guidance (1 = off)")
    gen.add_argument("--grid", type=_grid, help="token grid ROWSxCOLS, e.g. 7x14")
    gen.add_argument("--stream", action="store_true",
                     help="draw the rows in the terminal as they are sampled")
    gen.add_argument("-o", "--output", default="generated.png",
                     help="image file; several images are tiled (default: %(default)s)")
    gen.add_argument("--tokens", metavar="JSON", help="also write the token grids to this file")
    _connection(gen)

    enc = sub.add_parser("encode", help="turn images into token grids", description=(
        "Tokenize images; prints {model, shape, tokens} as JSON."))
    enc.add_argument("images", nargs="+", help="image files (PNG, JPEG, WebP); - reads stdin")
    enc.add_argument("--model", help="model name (default: the server's default model)")
    enc.add_argument("-o", "--output", help="write the JSON here instead of stdout")
    _connection(enc)

    dec = sub.add_parser("decode", help="turn token grids into images", description=(
        "Decode token grids from a JSON file: the output of `taming encode`, a /generate JSON "
        "answer, or a bare grid or list of grids."))
    dec.add_argument("tokens", help="JSON file; - reads stdin")
    dec.add_argument("--model", help="model name (default: the file's, else the server's)")
    dec.add_argument("-o", "--output", default="decoded.png",
                     help="image file; several images are tiled (default: %(default)s)")
    _connection(dec)

    mod = sub.add_parser("models", help="list the server's models", description=(
        "List the loaded models with their grid, codebook, classes and sampling defaults."))
    mod.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    _connection(mod)
    return parser


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _write_json(obj: Any, path: str | None) -> None:
    text = json.dumps(obj, separators=(",", ":")) + "\n"
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _tokens_json(model: str, grids: Sequence[np.ndarray]) -> dict[str, Any]:
    return {"model": model, "shape": list(grids[0].shape),
            "tokens": [np.asarray(g).tolist() for g in grids]}


def cmd_generate(client: TamingClient, args: argparse.Namespace) -> None:
    params = GenerateParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(
        GenerateParams) if hasattr(args, f.name)})  # the options are named as its fields
    if args.stream:
        painter = RowPainter(sys.stderr, args.n)
        result = None
        for item in client.stream(params):
            if isinstance(item, RowEvent):
                painter.add(item)
            else:
                result = item
        assert isinstance(result, Generation)
        if painter.next_row == 0:
            painter.whole(result.images)
    else:
        result = client.generate(params)
    result.save(args.output)
    if args.tokens:
        _write_json(_tokens_json(result.model, result.tokens), args.tokens)
    seeds = (f"seed {result.seed}" if len(result.seeds) == 1
             else f"seeds {result.seeds[0]}-{result.seeds[-1]}")
    print(f"{args.output}: {len(result.images)} image(s) from {result.model}, {seeds}")


def cmd_encode(client: TamingClient, args: argparse.Namespace) -> None:
    model = args.model or client.models().default
    grids = client.encode([_read(p) for p in args.images], model=model)
    _write_json(_tokens_json(model, list(grids)), args.output)


def grids_of(doc: Any) -> tuple[Any, str | None]:
    """The grids and model name of a tokens file (see `taming decode --help`)."""
    if isinstance(doc, dict) and "tokens" in doc:
        return doc["tokens"], doc.get("model")
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        return [im["tokens"] for im in doc["images"]], doc.get("model")
    if isinstance(doc, list):
        return doc, None
    raise ValueError("the file holds no token grids: expected {\"tokens\": ...}, a /generate "
                     "JSON answer, or a list of grids")


def cmd_decode(client: TamingClient, args: argparse.Namespace) -> None:
    try:
        doc = json.loads(_read(args.tokens))
    except json.JSONDecodeError as e:
        raise ValueError(f"{args.tokens} is not JSON: {e}") from None
    grids, model = grids_of(doc)
    images = client.decode(grids, model=args.model or model)
    tile(images).save(args.output)
    print(f"{args.output}: {len(images)} image(s)")


def cmd_models(client: TamingClient, args: argparse.Namespace) -> None:
    listing = client.models()
    if args.json:
        _write_json({"default": listing.default,
                     "models": [dataclasses.asdict(m) for m in listing]}, None)
        return
    for m in listing:
        d = m.defaults
        star = " (default)" if m.name == listing.default else ""
        what = "generates" if m.can_generate else "tokenizer only"
        print(f"{m.name}{star}: {m.image_size[0]}x{m.image_size[1]}x{m.channels} px, "
              f"grid {m.grid[0]}x{m.grid[1]} (max {m.max_grid[0]}x{m.max_grid[1]}), "
              f"K={m.codebook_size}, {what}")
        print(f"  classes: {', '.join(m.classes) or '-'}")
        print(f"  defaults: temperature={d.temperature} top_k={d.top_k} top_p={d.top_p} "
              f"cfg_scale={d.cfg_scale}")


COMMANDS = {"generate": cmd_generate, "encode": cmd_encode, "decode": cmd_decode,
            "models": cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with TamingClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            COMMANDS[args.command](client, args)
    except BrokenPipeError:  # `taming models | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except TamingError as e:
        where = f"HTTP {e.status}, " if e.status else ""
        print(f"taming: error: {e.message} ({where}{e.code})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"taming: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
