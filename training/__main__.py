"""`python -m training COMMAND ...`: train and evaluate the models the server ships."""

from __future__ import annotations

import argparse
import sys

from . import classifier, generator, perceptual, photos, scenes, sheet, taming_import, vqvae
from .data import DatasetError
from .taming_import import TamingImportError


def _photos_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write every file again")


def _extract(args: argparse.Namespace) -> None:
    try:
        n = photos.extract_nature(force=args.force)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(str(e)) from e
    print(f"{n} photographs written to {photos.NATURE_DIR} "
          f"({len(photos.nature_list())} listed in {photos.NATURE_LIST.name})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {  # name: (help, add its arguments, run it)
        "photos": ("extract the photographs of training/nature.csv into data/nature (the .rcc "
                   "members included); `make photos` installs their packages first",
                   _photos_args, _extract),
        "vqvae": ("train the tokenizer: VQ-VAE, or VQGAN with --loss vqgan",
                  vqvae.add_args, vqvae.train),
        "perceptual": ("train the feature net of the VQGAN's perceptual loss",
                       perceptual.add_args, perceptual.main),
        "classifier": ("train the evaluation classifier (class accuracy, domain FID)",
                       classifier.add_args, classifier.main),
        "evaluate-vqvae": ("held-out PSNR/usage/perplexity; domain FID of reconstructions of "
                           "training images", vqvae.add_eval_args, vqvae.evaluate),
        "transformer": ("train the class-conditional transformer",
                        generator.add_args, generator.train),
        "evaluate-generator": ("class accuracy and domain FID of samples",
                               generator.add_eval_args, generator.evaluate),
        "evaluate-scenes": ("photo crops: sliced Wasserstein distance of reconstructions and "
                            "samples, beside its floor and a blur baseline", scenes.add_args,
                            scenes.evaluate),
        "import-taming": ("the paper's published models: a CompVis taming-transformers log "
                          "folder as a checkpoint folder", taming_import.add_args,
                          taming_import.main),
        "sheet": ("a contact sheet of samples, one row per class", sheet.add_args, sheet.main),
    }
    for name, (help_text, add_args, _) in commands.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        commands[args.command][2](args)
    except (DatasetError, TamingImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
