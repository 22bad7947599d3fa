"""`python -m training COMMAND ...`: train and evaluate the models the server ships."""

from __future__ import annotations

import argparse
import sys

from . import classifier, generator, perceptual, vqvae
from .data import DatasetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("vqvae", help="train the tokenizer: VQ-VAE, or VQGAN with --loss vqgan")
    vqvae.add_args(p)
    p = sub.add_parser("perceptual", help="train the feature net of the VQGAN's perceptual loss")
    perceptual.add_args(p)
    p = sub.add_parser("classifier", help="train the evaluation classifier (class accuracy, domain FID)")
    classifier.add_args(p)
    p = sub.add_parser("evaluate-vqvae", help="held-out PSNR/usage/perplexity; domain FID of "
                                              "reconstructions of training images")
    vqvae.add_eval_args(p)
    p = sub.add_parser("transformer", help="train the class-conditional transformer")
    generator.add_args(p)
    p = sub.add_parser("evaluate-generator", help="class accuracy and domain FID of samples")
    generator.add_eval_args(p)
    args = parser.parse_args(argv)
    try:
        if args.command == "vqvae":
            vqvae.train(args)
        elif args.command == "perceptual":
            perceptual.main(args)
        elif args.command == "classifier":
            classifier.main(args)
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
