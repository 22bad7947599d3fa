"""`python -m training COMMAND ...`: train and evaluate the models the server ships."""

from __future__ import annotations

import argparse
import sys

from . import generator, vqvae
from .data import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("vqvae", help="train the VQ-VAE tokenizer")
    vqvae.add_args(p)
    p = sub.add_parser("evaluate-vqvae", help="MSE/PSNR/usage/perplexity on the held-out split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("transformer", help="train the class-conditional transformer")
    generator.add_args(p)
    p = sub.add_parser("evaluate-generator", help="class accuracy and domain FID of samples")
    generator.add_eval_args(p)
    args = parser.parse_args(argv)
    try:
        if args.command == "vqvae":
            vqvae.train(args)
        elif args.command == "evaluate-vqvae":
            vqvae.evaluate(args)
        elif args.command == "transformer":
            generator.train(args)
        elif args.command == "evaluate-generator":
            generator.evaluate(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
