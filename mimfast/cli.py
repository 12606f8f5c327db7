"""The ``mimfast`` command line.

    mimfast pretrain [--preset tiny] [--model ...] [--data builtin|FOLDER] ...
    mimfast export CHECKPOINT --out PATH [--model NAME] [--global-pool]
    mimfast linprobe CHECKPOINT [--model NAME] [--data builtin|FOLDER] [--pool cls|mean] ...
    mimfast tokenizer train [--data builtin|FOLDER] [--img-size 112] ...   (a VQ tokenizer for BEiT)
    mimfast tokenizer convert encoder.pkl encoder.safetensors             (DALL-E weights)
"""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from mimfast.train.config import config_from_args
    from mimfast.train.pretrain import pretrain

    # the quickstart: no model, data, config or --init-from named -> a small preset on the built-in
    # data; naming a dataset gets the method's recipe (MAE ViT-B/16 at 224), as main_pretrain.py
    # would, and --init-from FILE the model the file holds
    given = vars(args)
    if not ({"preset", "model", "data", "data_path", "init_from"} & set(given)) and not given.get("config"):
        small = {"beit": "beit-tiny", "simmim": "simmim-tiny"}.get(given.get("recipe") or given.get("method"))
        args.preset = small or ("tiny" if not torch.cuda.is_available() else "small")
    cfg = config_from_args(args)
    summary = pretrain(cfg)
    return 0 if summary["status"] == "done" else 1


def build_parser() -> argparse.ArgumentParser:
    from mimfast.train.config import build_parser as build_pretrain_parser

    parser = argparse.ArgumentParser(prog="mimfast", description="Fast masked-image-modeling pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="MAE/BEiT pretraining (default: a small MAE on the built-in dataset)",
                       argument_default=argparse.SUPPRESS)
    build_pretrain_parser(p)
    p.set_defaults(func=_cmd_pretrain)
    from mimfast.train.export import add_export_command
    from mimfast.train.linprobe import add_linprobe_command

    add_export_command(sub)
    add_linprobe_command(sub)
    from mimfast.train.tokenizer_train import add_tokenizer_command

    add_tokenizer_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
