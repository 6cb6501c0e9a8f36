"""`qtrain train RECIPE [key.sub=value ...]`.

User errors (`QtrainError`) print one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qtrain.errors import EXIT_USER_ERROR, QtrainError, TrainingStopped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Fine-tune LLMs with LoRA on a 4-bit NF4 base.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an adapter from a YAML recipe")
    t.add_argument("recipe", help="path of the YAML recipe, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override recipe keys, e.g. train.max_steps=20 data.path=my.jsonl model.tokenizer=null")
    return p


def _train(args: argparse.Namespace) -> int:
    from qtrain.config import load_recipe
    from qtrain.train.run import train

    train(load_recipe(args.recipe, args.overrides))
    return 0


def _quiet_optional_backends() -> None:
    """bitsandbytes warns at import that an optional CPU kernel package (`kernels`) is missing;
    qtrain never uses that path, so the CLI keeps it off the user's terminal."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_optional_backends()
    try:
        return {"train": _train}[args.command](args)
    except QtrainError as exc:
        print(f"qtrain: {exc.kind}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as exc:
        print(f"qtrain: stopped: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
