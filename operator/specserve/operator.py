"""`specserve operator` / `python -m specserve.operator`: run the kopf operator.

    python -m specserve.operator --all-namespaces
    python -m specserve.operator --namespace team-a --namespace team-b \
        --liveness http://0.0.0.0:8080/healthz

Equivalent to `kopf run -m specserve.handlers …`; this wrapper exists so the operator image
and the Helm chart have one stable entry point with the project's defaults (standalone unless
--peering is given, plain log format).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; kopf glob patterns allowed)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch the whole cluster (default)"
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="use kopf peering NAME (several operator replicas); default: standalone",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="verbose logging")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format", choices=["plain", "full", "json"], default="full", help="log format"
    )


def run(args: argparse.Namespace) -> int:
    import kopf

    import specserve.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(
        verbose=args.verbose,
        debug=args.debug,
        log_format=kopf.LogFormat[args.log_format.upper()],
    )
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=list(args.namespace),
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve operator", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
