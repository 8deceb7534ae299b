"""`specserve` command line: one entry point, one module per subcommand, imported lazily (so
`specserve crd` does not import kopf). Each module exposes `add_arguments(parser)` and
`run(args) -> int`; add a subcommand by adding a row to SUBCOMMANDS."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("specserve.operator", "run the SpecService operator (kopf)"),
    "crd": ("specserve.crdgen", "print the SpecService CRD YAML generated from specserve.api"),
    "demo": ("specserve.demo", "the whole loop on this machine: cluster, engine, Prometheus"),
    "node-agent": ("specserve.localnode.cli", "run pods bound to a local Node as processes"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="specserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        parser.print_usage(sys.stderr)
        print(f"specserve: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    cmd_parser = argparse.ArgumentParser(prog=f"specserve {argv[0]}", description=help_text)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
