"""The `kafscribe` command: run the stack, the services, and submit jobs."""

from __future__ import annotations

import argparse
import sys

from .settings import Settings, SettingsError, settings_table


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from infra import stack

    if args.action == "up":
        stack.up(settings)
        rows = stack.status(settings)
    elif args.action == "down":
        stack.down(settings)
        return 0
    else:
        rows = stack.status(settings)
    for row in rows:
        print(row.line())
    return 0 if all(r.ready for r in rows) else 1


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    for var, value, doc in settings_table(settings):
        print(f"{var:<36} {value:<40} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kafscribe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="local Kafka + Cassandra")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)

    p = sub.add_parser("settings", help="print every KAFSCRIBE_* setting and its value")
    p.set_defaults(func=_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"kafscribe: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
