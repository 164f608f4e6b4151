"""The ``ckptkit`` command: the parser, and one place that turns errors into exit statuses."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from ckptkit._cli import _inspect, _maintain, _plot
from ckptkit._cli._common import FAILED, USAGE, CliError, count, parse_step, storage_option
from ckptkit._errors import CheckpointNotFoundError, CkptkitError
from ckptkit._version import __version__

_STEP_NOTE = """\
STEP is a step number, 'latest', or 'best' (by --monitor, or by the monitor of the stopping
policy saved in the latest checkpoint).

"""

_EXIT_STATUS = """\
exit status:
  0  success
  1  a checkpoint failed verification, or the store could not be read or changed (a corrupt
     manifest or checkpoint, another process holding the lock, a disk error)
  2  a usage problem: bad arguments, a path that is not a store, a step that does not exist,
     matplotlib missing for 'plot'
"""


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "root",
        metavar="ROOT",
        help="the store's directory (it holds manifest.json), or its URL (s3://bucket/prefix, "
        "gs://bucket/prefix)",
    )
    p.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=storage_option,
        help="how to reach an s3:// or gs:// store, repeatable: endpoint_url, region_name, key, "
        "secret, token, anon=true (s3), project, token (gs) (default: the credentials the "
        "cloud's own tools find)",
    )


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document")


def _add_ranking(p: argparse.ArgumentParser, purpose: str = "STEP 'best'") -> None:
    p.add_argument(
        "--monitor",
        metavar="NAME",
        help=f"metric that ranks checkpoints for {purpose} (default: the monitor of the "
        "stopping policy saved in the latest checkpoint, if any)",
    )
    p.add_argument(
        "--mode",
        choices=("min", "max", "auto"),
        help="whether lower (min) or higher (max) is better; auto infers it from the name "
        "(default: the stopping policy's mode for its monitor, else auto)",
    )


def _add_step(p: argparse.ArgumentParser, nargs: str | None = None) -> None:
    p.add_argument(
        "step",
        metavar="STEP",
        nargs=nargs,
        type=_step_type,
        help="a step number, 'latest' or 'best'"
        + (" (default: every checkpoint)" if nargs else ""),
    )


def _step_type(text: str) -> int | str:
    try:
        return parse_step(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid STEP {text!r}: give a step number >= 0, 'latest' or 'best'"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``ckptkit`` argument parser, one subcommand per action."""
    parser = argparse.ArgumentParser(
        prog="ckptkit",
        description="Inspect, verify and maintain ckptkit checkpoint stores.",
        epilog=_STEP_NOTE + _EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, summary: str, run: Callable[[argparse.Namespace], int], *, step: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(summary + ".", 90),
            epilog=(_STEP_NOTE if step else "") + _EXIT_STATUS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(run=run)
        return p

    p = command(
        "ls",
        "List the checkpoints: step, metrics, size, creation time, and which are latest, best "
        "and pinned",
        _inspect.ls,
        step=False,
    )
    _add_root(p)
    _add_ranking(p, "the best flag")
    _add_json(p, "the listing")

    p = command(
        "show",
        "Show one checkpoint: metrics, metadata, files with checksums, tensors (name, dtype, "
        "shape, size) and the state's non-array values; long lists are cut unless --all",
        _inspect.show,
    )
    _add_root(p)
    _add_step(p)
    p.add_argument(
        "--all",
        action="store_true",
        help="show everything: every list item, dict key and tensor, and the stopping "
        "policy's saved state inside the metadata",
    )
    _add_ranking(p)
    _add_json(p, "the checkpoint")

    p = command(
        "verify",
        "Check the sizes and checksums of every file of one checkpoint, or of all; exit 1 "
        "naming each bad file if any differs",
        _maintain.verify,
    )
    _add_root(p)
    _add_step(p, nargs="?")
    _add_ranking(p)
    _add_json(p, "the results")

    p = command(
        "prune",
        "Apply a retention policy now: delete every checkpoint no option keeps (pinned "
        "checkpoints and the newest one are always kept)",
        _maintain.prune,
        step=False,
    )
    _add_root(p)
    p.add_argument("--keep-last", type=count(0), metavar="N", help="keep the N newest")
    p.add_argument("--keep-best", type=count(0), metavar="K", help="keep the K best by --monitor")
    p.add_argument(
        "--keep-every", type=count(1), metavar="E", help="keep every step divisible by E"
    )
    _add_ranking(p, "--keep-best")
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted; delete nothing"
    )
    _add_json(p, "what was kept and deleted")

    for name, run, summary in (
        ("pin", _maintain.pin, "Pin a checkpoint: retention never deletes it"),
        ("unpin", _maintain.unpin, "Unpin a checkpoint: retention may delete it again"),
    ):
        p = command(name, summary, run)
        _add_root(p)
        _add_step(p)
        _add_ranking(p)
        _add_json(p, "the result")

    p = command(
        "plot",
        "Plot a metric over the kept checkpoints, marking the best and the step where the "
        "stopping policy stopped (needs matplotlib: pip install 'ckptkit-ml[plot]')",
        _plot.plot,
        step=False,
    )
    _add_root(p)
    p.add_argument(
        "--metric",
        metavar="NAME",
        help="the metric to plot (default: the stopping policy's monitor)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="image to write; the format follows the extension (.png, .svg, .pdf)",
    )
    p.add_argument(
        "--mode",
        choices=("min", "max", "auto"),
        help="which direction is better, to mark the best (default: the stopping policy's "
        "mode for its monitor, else inferred from the name)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckptkit`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CliError as e:
        return _fail(str(e), e.code)
    except CheckpointNotFoundError as e:
        return _fail(str(e), USAGE)
    except CkptkitError as e:
        return _fail(str(e), FAILED)
    except ValueError as e:  # an option the library refused (the message names it)
        return _fail(str(e), USAGE)
    except OSError as e:  # outside the store's own errors: permissions, a missing output folder
        if isinstance(e, BrokenPipeError):
            return _closed_stdout()
        return _fail(str(e), FAILED)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int) -> int:
    print(f"ckptkit: error: {message}", file=sys.stderr)
    return code


def _closed_stdout() -> int:
    """The reader of our output went away (``ckptkit ls ROOT | head``): exit quietly."""
    # Python would report the broken pipe again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return FAILED
