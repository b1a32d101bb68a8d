"""The ``prunekit`` command line.

    prunekit eval --model cifar_resnet56 --weights pretrained [--data DIR] [--split test] [--json]
    prunekit prune --model cifar_resnet56 --weights pretrained --criterion l1 --macs-reduction 0.5
                   [--finetune-epochs 2 ...] --out runs/l1_50
    prunekit prune --recipe chip_resnet56_47 --out runs/chip47
    prunekit prune --method sfp --ratio 0.4 ...   (every registered method, its options as flags)
    prunekit finetune RUN_DIR --epochs 10      prunekit export RUN_DIR/model.safetensors --onnx
    prunekit report RUN_DIR...                 prunekit models | explain

Errors prunekit foresees (:class:`prunekit.errors.PrunekitError`, and files that cannot be
read or written) print one message and exit with code 2; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import errno
import sys
import warnings

from ..errors import PrunekitError
from .commands import add_inspect_parsers
from .prune import add_finetune_parser, add_prune_parser

__all__ = ["main"]

_RESUMABLE = ("prune", "finetune")


def _parser() -> argparse.ArgumentParser:
    # Built per call: methods registered after import (plugins, tests) get their flags too.
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_inspect_parsers(sub)
    add_prune_parser(sub)
    add_finetune_parser(sub)
    return parser


def _os_error_message(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on device ({exc.filename or exc}); free space and rerun"
    return str(exc)


def _show_prunekit_warnings(command: str):
    """A warnings.showwarning that prints prunekit's own warnings as one CLI line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] != "prunekit":
            return default(message, category, filename, lineno, file, line)
        print(f"prunekit {command}: warning: {message}", file=sys.stderr)

    return show


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_prunekit_warnings(args.command)
    try:
        return _run(args)
    finally:
        warnings.showwarning = previous


def _run(args) -> int:
    try:
        return args.func(args)
    except PrunekitError as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            FileExistsError) as exc:
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"prunekit {args.command}: error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Only the run commands resume; anything else simply stopped.
        advice = "; rerun the same command to resume" if args.command in _RESUMABLE else ""
        print(f"prunekit {args.command}: interrupted{advice}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
