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

from ..errors import PrunekitError
from .commands import add_inspect_parsers
from .prune import add_finetune_parser, add_prune_parser

__all__ = ["main"]


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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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
        print(f"prunekit {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
