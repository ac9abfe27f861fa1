"""The `kafscribe` command: run the stack, the services, and submit jobs."""

from __future__ import annotations

import argparse
import sys

from kafscribe.cli import jobs as cli_jobs
from kafscribe.settings import Settings, SettingsError, settings_markdown, settings_table


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from infra import bootstrap, stack

    if args.action == "bootstrap":  # topics and schema only, on servers that run anywhere
        try:
            bootstrap.run(settings, wait_s=args.wait)
        except (bootstrap.NotReachable, bootstrap.ReplicationError, ValueError) as exc:
            print(f"kafscribe: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.action == "up":
        try:
            stack.up(settings)
        except (stack.StackError, bootstrap.ReplicationError, ValueError) as exc:
            print(f"kafscribe: {exc}", file=sys.stderr)
            return 1
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
    if args.markdown:  # docs/settings.md: defaults, not this shell's values
        sys.stdout.write(settings_markdown())
        return 0
    for var, value, doc in settings_table(settings):
        print(f"{var:<36} {value:<40} {doc}")
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.stage == "ingress":
        from producers.ingress import serve

        return serve(settings)
    if args.stage == "lag":
        from kafscribe.kafka.lag import serve as serve_lag

        return serve_lag(settings)
    from consumers.worker import serve

    return serve(args.stage, settings)


def _services(args: argparse.Namespace, settings: Settings) -> int:
    from kafscribe.cli import services

    if args.action == "supervise":
        names = [n for n in args.names.split(",") if n] if args.names else services.DEFAULT_SERVICES
        return services.supervise(settings, names)
    if args.action == "up":
        services.up(settings)
    elif args.action == "down":
        services.down(settings)
        return 0
    rows = services.status(settings)
    for row in rows:
        print(row.line())
    return 0 if all(row.pid for row in rows) else 1


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from kafscribe.speech.models import offline

    if args.action == "prepare":
        names = args.names or [settings.model if settings.model in offline.PACKAGED else "base", "tiny.en"]
        for name, path in offline.prepare(names, settings.cache_dir, openai=not args.no_openai).items():
            print(f"{name}: {path}")
    elif args.action == "convert":
        if len(args.names) != 2:
            print("usage: kafscribe models convert CT2_DIR OUTPUT.pt", file=sys.stderr)
            return 2
        from kafscribe.speech.models.ct2_to_whisper import convert

        print(convert(Path(args.names[0]), Path(args.names[1])))
    return 0


def _webhooks(args: argparse.Namespace, settings: Settings) -> int:
    """Show (creating on first use), rotate or revoke a tenant's webhook secret; the secret is the last line."""
    from kafscribe.store import session as cassandra_session
    from kafscribe.store.webhook_secrets import WebhookSecrets

    if not args.tenant.strip():
        print("kafscribe: --tenant must not be empty", file=sys.stderr)
        return 2
    try:
        session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way
        print(f"kafscribe: Cassandra unreachable at {settings.cassandra_hosts}:{settings.cassandra_port}: {exc}",
              file=sys.stderr)
        return 1
    try:
        store = WebhookSecrets(session, settings.callback_secret_overlap_s)
        revoked: list[int] = []
        if args.revoke:
            version, revoked = store.revoke(args.tenant)
        else:
            version = store.rotate(args.tenant) if args.rotate else store.current(args.tenant)
        until = store.previous_valid_until(args.tenant)
    finally:
        session.cluster.shutdown()
    print(f"tenant {version.tenant}: webhook secret version {version.version}, "
          f"created {version.created_at.isoformat(timespec='seconds')}")
    if args.revoke:
        gone = ", ".join(str(v) for v in revoked) or "none"
        print(f"revoked version(s) {gone}: from the next delivery on only this secret signs")
    if until is not None:
        print(f"the previous secret also signs until {until.isoformat(timespec='seconds')}")
    print(version.secret)
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from kafscribe.store import apikeys
    from kafscribe.store import session as cassandra_session

    try:
        session = cassandra_session.connect(settings, keyspace=settings.cassandra_keyspace)
    except Exception as exc:  # noqa: BLE001 - any failure: say where we looked
        print(f"kafscribe: cannot reach Cassandra at {settings.cassandra_hosts}:{settings.cassandra_port}"
              f" (keyspace {settings.cassandra_keyspace}; `kafscribe stack up` starts it): {exc}", file=sys.stderr)
        return 1
    try:
        store = apikeys.KeyStore(session)
        if args.action == "create":
            if not args.tenant:
                print("kafscribe: keys create needs --tenant NAME", file=sys.stderr)
                return 2
            key, record = store.create(args.tenant, admin=args.admin, label=args.label or "")
            print(f"created {'admin ' if record.admin else ''}key {record.key_id} of tenant {record.tenant}"
                  " (shown once; send it as 'Authorization: Bearer KEY' or set KAFSCRIBE_API_KEY):")
            print(key)
        elif args.action == "local":
            print(_local_key(store, settings))
        elif args.action == "list":
            print(f"{'key_id':<13} {'tenant':<20} {'admin':<6} {'state':<8} {'created':<26} label")
            for k in store.list(args.tenant):
                state = "active" if k.active else "revoked"
                print(f"{k.key_id:<13} {k.tenant:<20} {'yes' if k.admin else 'no':<6} {state:<8} "
                      f"{k.created_at.isoformat(timespec='seconds') if k.created_at else '':<26} {k.label}")
        else:
            if not args.key:
                print("kafscribe: keys revoke needs a key id (see keys list) or the key", file=sys.stderr)
                return 2
            record = store.revoke(args.key)
            print(f"revoked key {record.key_id} of tenant {record.tenant}")
    except apikeys.ApiKeyError as exc:
        print(f"kafscribe: {exc}", file=sys.stderr)
        return 1
    finally:
        session.cluster.shutdown()
    return 0


def _local_key(store, settings: Settings) -> str:
    """The local development key (admin, tenant `default`) kept in the state directory; made once."""
    path = settings.state_dir / "local-api-key"
    if path.exists():
        key = path.read_text().strip()
        if store.lookup(key) is not None:
            return key
    key, _ = store.create("default", admin=True, label="local (make up)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kafscribe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="local Kafka + Cassandra; bootstrap: topics and schema on any servers")
    p.add_argument("action", choices=["up", "down", "status", "bootstrap"],
                   help="bootstrap: create the topics of kafscribe/kafka/topics.toml and the tables of"
                   " infra/cql on the configured Kafka and Cassandra (started elsewhere), then exit")
    p.add_argument("--wait", type=float, help="bootstrap: seconds to wait for both servers to answer"
                   " (default KAFSCRIBE_STACK_TIMEOUT_S)")
    p.set_defaults(func=_stack)

    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("stage", choices=["ingress", "transcriber", "translator", "sink", "notifier", "merger", "lag"])
    p.add_argument("--instance", help="name of this instance (pid file tag)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("services", help="the pipeline's processes in the background, supervised")
    p.add_argument("action", choices=["up", "down", "status", "supervise"],
                   help="supervise: run the supervisor in the foreground (what `up` starts)")
    p.add_argument("--names", help="supervise: comma-separated services (default: all)")
    p.add_argument("--instance", help="name of this instance (pid file tag)")
    p.set_defaults(func=_services)

    p = sub.add_parser("models", help="offline Whisper models")
    p.add_argument("action", choices=["prepare", "convert"])
    p.add_argument("names", nargs="*", help="prepare: model names (default: the configured one and tiny.en); "
                   "convert: CT2_DIR OUTPUT.pt")
    p.add_argument("--no-openai", action="store_true", help="skip the openai-whisper checkpoint")
    p.set_defaults(func=_models)

    cli_jobs.add_parsers(sub)  # submit, jobs

    p = sub.add_parser("webhooks", help="tenants' webhook signing secrets")
    p.add_argument("action", choices=["secret"])
    p.add_argument("--tenant", required=True, help="whose secret (created on first use)")
    change = p.add_mutually_exclusive_group()
    change.add_argument("--rotate", action="store_true",
                        help="make a new secret; the old one keeps signing for KAFSCRIBE_CALLBACK_SECRET_OVERLAP_S")
    change.add_argument("--revoke", action="store_true",
                        help="a secret leaked: make a new secret and end every older one at once (no overlap)")
    p.set_defaults(func=_webhooks)
    p = sub.add_parser("keys", help="API keys of the ingress (stored hashed in Cassandra)")
    p.add_argument("action", choices=["create", "list", "revoke", "local"],
                   help="create: print a new key as the last line; list; revoke KEY_ID|KEY; "
                   "local: the local admin key of `make up` (made once, kept in the state dir)")
    p.add_argument("key", nargs="?", help="revoke: the key id (see list) or the key")
    p.add_argument("--tenant", help="create: the key's tenant; list: only this tenant's keys")
    p.add_argument("--admin", action="store_true", help="create: may act for any tenant and see /v1/workers")
    p.add_argument("--label", help="create: a note shown by list (who has the key)")
    p.set_defaults(func=_keys)

    p = sub.add_parser("settings", help="print every KAFSCRIBE_* setting and its value")
    p.add_argument("--markdown", action="store_true", help="docs/settings.md: every setting and its default, as Markdown")
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
