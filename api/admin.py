"""``distill-admin``: operator commands that need database access rather than an API key.

    distill-admin upgrade                     # run the database migrations (alembic upgrade head)
    distill-admin create-key NAME             # prints a new API key (the tenant is created if new);
                                              # --tenant NAME is accepted as well
    distill-admin list-keys                   # prefixes, tenants, revoked or not
    distill-admin revoke-key PREFIX           # revoke every key with this prefix

Settings come from the environment (``RD_DATABASE_URL`` ...), as for the API and the worker.
"""

from __future__ import annotations

import argparse
import sys

import sqlalchemy as sa

from service.auth import create_api_key, revoke_api_key
from service.db import make_engine, make_session_factory, session_scope, upgrade_to_head
from service.models import ApiKey, Tenant
from service.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-admin", description="Operator commands for the distillation service."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("upgrade", help="bring the database schema up to date")
    create = sub.add_parser("create-key", help="create an API key and print it")
    create.add_argument("tenant", nargs="?", help="tenant name (created when new)")
    create.add_argument("--tenant", dest="tenant_option", metavar="TENANT", help="the same, as an option")
    sub.add_parser("list-keys", help="list key prefixes by tenant")
    revoke = sub.add_parser("revoke-key", help="revoke the keys with this prefix")
    revoke.add_argument("prefix", help="the 8 characters after 'rd_'")
    return parser


def _tenant_name(args: argparse.Namespace) -> str | None:
    """The tenant of ``create-key``, given as ``NAME`` or ``--tenant NAME`` (both must agree); None after
    printing why when it is missing, empty or contradictory."""
    given = {n.strip() for n in (args.tenant, args.tenant_option) if n is not None}
    if len(given) > 1:
        print(f"distill-admin: two different tenants given: {' and '.join(sorted(given))}", file=sys.stderr)
        return None
    name = given.pop() if given else ""
    if not name:
        print("distill-admin: create-key needs a tenant name: distill-admin create-key NAME", file=sys.stderr)
        return None
    return name


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    if args.command == "upgrade":
        upgrade_to_head(settings.database_url)
        print("database is at the newest schema")
        return 0
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    try:
        with session_scope(factory) as session:
            if args.command == "create-key":
                name = _tenant_name(args)
                if name is None:
                    return 2
                print(create_api_key(session, name))
            elif args.command == "list-keys":
                rows = session.execute(
                    sa.select(ApiKey.prefix, Tenant.name, ApiKey.created_at, ApiKey.revoked_at)
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .order_by(Tenant.name, ApiKey.created_at)
                )
                for prefix, tenant, created, revoked in rows:
                    state = f"revoked {revoked:%Y-%m-%d}" if revoked else "active"
                    print(f"rd_{prefix}_...  {tenant}  created {created:%Y-%m-%d %H:%M}  {state}")
            elif args.command == "revoke-key":
                count = revoke_api_key(session, args.prefix.removeprefix("rd_").split("_")[0])
                print(f"revoked {count} key(s)")
                if not count:
                    return 1
    except sa.exc.OperationalError as exc:
        print(
            f"distill-admin: cannot use the database ({exc.orig}); run 'distill-admin upgrade' first?",
            file=sys.stderr,
        )
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
