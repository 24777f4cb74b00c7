"""`lmqueue keys create|list|limits|revoke`: manage API keys directly in the result store.

Works without a running API (the first admin key has to come from somewhere); needs the
database migrated (`lmqueue migrate`).
"""

from __future__ import annotations

import argparse
import json
import sys

from lmqueue import keys
from lmqueue.db import session_scope


def cmd_keys_create(args: argparse.Namespace) -> int:
    with session_scope() as session:
        row, plaintext = keys.create_key(session, name=args.name, admin=args.admin)
        info = keys.key_to_dict(row)
    print(plaintext)  # the only time the key is shown; stdout carries it alone, for scripts
    print(
        f"created {info['id']} ({' '.join(info['scopes'])}); store the key now, "
        "it cannot be shown again",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with session_scope() as session:
        rows = [keys.key_to_dict(r) for r in keys.list_keys(session)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "revoked" if r["revoked_at"] else "active"
        print(f"{r['id']}  {r['prefix']}…  {','.join(r['scopes']):<10}  {state:<7}  {r['name']}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with session_scope() as session:
        row = keys.revoke_key(session, args.id)
    if row is None:
        print(f"no key {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked {row.id}")
    return 0


def _limit_arg(text: str) -> float | str:
    """A limit on the command line: a number >= 0, or "default" (use the setting again)."""
    if text == "default":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("limits are >= 0 (0 = no limit)")
    return value


def cmd_keys_limits(args: argparse.Namespace) -> int:
    values: dict[str, float | int | None] = {}
    for name in keys.LIMIT_FIELDS:
        value = getattr(args, name)
        if value is not None:
            values[name] = None if value == "default" else value
    with session_scope() as session:
        row = keys.set_limits(session, args.id, _typed(values))
        info = keys.key_to_dict(row) if row is not None else None
    if info is None:
        print(f"no key {args.id!r}", file=sys.stderr)
        return 1
    print(json.dumps({k: info[k] for k in ("id", *keys.LIMIT_FIELDS)}))
    return 0


def _typed(values: dict[str, float | int | None]) -> dict[str, float | int | None]:
    """Quotas are whole numbers; the weight may be fractional."""
    return {k: v if v is None or k == "weight" else int(v) for k, v in values.items()}


def add_keys_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    k = sub.add_parser("keys", help="manage API keys (create, list, limits, revoke)")
    ksub = k.add_subparsers(dest="keys_command", required=True)

    c = ksub.add_parser("create", help="create a key and print it (once)")
    c.add_argument("--name", default="")
    c.add_argument("--admin", action="store_true", help="may manage keys and the scheduler")
    c.set_defaults(fn=cmd_keys_create)

    ls = ksub.add_parser("list", help="list keys (never their secret)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_keys_list)

    lim = ksub.add_parser(
        "limits",
        help="set a key's fair-share weight and quotas (a number, 0 = no limit, or 'default')",
    )
    lim.add_argument("id")
    for flag, name in (
        ("--weight", "weight"),
        ("--queued-lines", "quota_queued_lines"),
        ("--queued-tokens", "quota_queued_tokens"),
        ("--file-bytes", "quota_file_bytes"),
    ):
        lim.add_argument(flag, dest=name, type=_limit_arg, default=None)
    lim.set_defaults(fn=cmd_keys_limits)

    r = ksub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id")
    r.set_defaults(fn=cmd_keys_revoke)
