"""The `eclipse-prior` command line: one module per sub-command in this package.

Each command module defines ``register(subparsers)`` which adds its parser and sets ``func`` to a callable
taking the parsed namespace and returning an exit code. Modules are imported lazily so `--help` stays fast
and a failing optional dependency breaks only its own command.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from eclipse_prior.errors import EclipsePriorError

# command name -> module (in eclipse_prior.cli) that registers it
COMMANDS: dict[str, str] = {
    "embed": "embed",
    "train": "train",
    "evaluate": "evaluate",
    "export": "export",
    "generate": "generate",
    "benchmark-images": "benchmark_images",
    "shapes": "shapes",
    "demo": "demo",
    "app": "app",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eclipse-prior", description="Train, evaluate and run ECLIPSE text-to-image priors."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in dict.fromkeys(COMMANDS.values()):
        try:
            module = importlib.import_module(f"eclipse_prior.cli.{module_name}")
        except ModuleNotFoundError as err:
            if err.name == f"eclipse_prior.cli.{module_name}":
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("eclipse-prior: interrupted", file=sys.stderr)
        return 130
    except EclipsePriorError as err:
        print(f"eclipse-prior {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in EXPECTED_OS_ERRORS:
            raise  # a real bug keeps its traceback
        print(f"eclipse-prior {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


# I/O failures that are the environment's, not a bug: a one-line error naming the file and the fix.
EXPECTED_OS_ERRORS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied: check the owner and mode, or choose another path",
    errno.EPERM: "operation not permitted: check the owner and mode, or choose another path",
    errno.EROFS: "read-only file system: choose an output on a writable disk",
    errno.ENOSPC: "no space left on the device: free space or choose another output disk, then rerun to resume",
    errno.EDQUOT: "disk quota exceeded: free space or choose another output disk, then rerun to resume",
    errno.EFBIG: "file too large for the file system or the process's file-size limit (ulimit -f)",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error from the device",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def describe_os_error(err: OSError) -> str:
    """``<path>: <what happened and the fix>`` for an expected I/O failure."""
    what = EXPECTED_OS_ERRORS.get(err.errno or 0, err.strerror or str(err))
    paths = [p for p in (err.filename, err.filename2) if p]
    return f"{' -> '.join(map(str, paths))}: {what}" if paths else f"{err.strerror or err}: {what}"


def _close_process_group() -> None:
    """Tear down a launched run's process group before the interpreter exits.

    The trainer leaves it up (later calls in one process reuse it); left to interpreter shutdown, gloo's
    threads occasionally abort the process ("terminate called without an active exception") after the run
    has finished and saved, which launchers then report as a failure.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
