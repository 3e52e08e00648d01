"""The `kimiserve` command: `up` starts the whole stack, `make-tiny-checkpoint` writes the default
model. Flags of `up` are generated from `StackConfig`'s fields."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from deploy.launcher import StackConfig, run_until_interrupted


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.default is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimiserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start gateway, router, prefill and decode pools")
    _add_dataclass_flags(up, StackConfig)
    tiny = sub.add_parser("make-tiny-checkpoint", help="write the tiny Kimi-K2.5 checkpoint")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = args.pop("command")
    if command == "make-tiny-checkpoint":
        from shared.checkpoint import make_tiny_checkpoint

        make_tiny_checkpoint(args["directory"], seed=args["seed"])
        return 0
    return run_until_interrupted(StackConfig(**args))


if __name__ == "__main__":
    sys.exit(main())
