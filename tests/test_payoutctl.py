"""payoutctl: migrations, clients and the reconciliation, on real PostgreSQL.

The CLI runs through click's runner against the test database; the few
breaches the schema's constraints forbid are built inside a transaction of
the test's own that drops the constraint and rolls back.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from click.testing import CliRunner, Result
from psycopg2 import sql
from psycopg2.extras import RealDictCursor

from shared import clients, embedded, reconcile
from shared.cli import main
from shared.db import Database

CLIENT = -1003296084379  # a fixture client: threshold 2.00, usdt on eth
CLIENT_OPEN = -1002000000001
OTHER = -1001000000002  # a fixture client: open channel -1002000000002
INSTANT = -1001000000003
WALLET = "0x2b5f1c9a7e3d4b6a8c0e1f2a3b4c5d6e7f8a9b0c"

Run = Callable[..., Result]


@pytest.fixture
def run(database_url: str, db: Database) -> Run:
    """Invoke payoutctl against the test database."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(
            main,
            list(args),
            env=env or {"DATABASE_URL": database_url},
            catch_exceptions=False,
        )

    return invoke


def client_rows(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute("SELECT * FROM clients ORDER BY client_id")
        return [dict(row) for row in cur.fetchall()]


def one_client(db: Database, client_id: int) -> dict[str, Any]:
    rows = [row for row in client_rows(db) if row["client_id"] == client_id]
    assert len(rows) == 1
    return rows[0]


def age_client(db: Database, client_id: int) -> datetime:
    """Move a client's updated_at into the past, so a bump is visible."""
    old = datetime(2001, 1, 1, tzinfo=UTC)
    with db.transaction() as cur:
        cur.execute(
            "UPDATE clients SET updated_at = %s WHERE client_id = %s",
            (old, client_id),
        )
    return old


# --- migrate ----------------------------------------------------------------


@pytest.fixture
def fresh_database_url(admin_url: str) -> Iterator[str]:
    name = f"payoutctl_migrate_{uuid.uuid4().hex[:8]}"
    url = embedded.ensure_database(admin_url, name)
    yield url
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (name,),
        )
        cur.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    conn.close()


def test_migrate_applies_the_schema_then_is_a_no_op(fresh_database_url: str) -> None:
    env = {"DATABASE_URL": fresh_database_url}

    first = CliRunner().invoke(main, ["migrate"], env=env, catch_exceptions=False)
    second = CliRunner().invoke(main, ["migrate"], env=env, catch_exceptions=False)

    assert first.exit_code == 0, first.output
    assert first.output.startswith("applied ")
    assert "0001.schema" in first.output
    assert second.exit_code == 0, second.output
    assert second.output == "schema is current: no migration to apply\n"
    conn = psycopg2.connect(fresh_database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients")
        assert cur.fetchone() == (0,)
    conn.close()


def test_commands_refuse_a_database_without_the_schema(
    fresh_database_url: str,
) -> None:
    env = {"DATABASE_URL": fresh_database_url}

    result = CliRunner().invoke(main, ["clients", "list"], env=env)

    assert result.exit_code == 2
    assert "run `payoutctl migrate`" in result.output


# --- configuration and an unreachable database -----------------------------


def test_bad_configuration_exits_2_without_a_traceback(run: Run) -> None:
    result = run("reconcile", env={"DATABASE_URL": "mysql://somewhere/payouts"})

    assert result.exit_code == 2
    assert "DATABASE_URL: must be a postgresql:// URL" in result.output
    assert "Traceback" not in result.output


def test_an_unreachable_database_exits_3_and_is_never_clean(run: Run) -> None:
    url = "postgresql://postgres@127.0.0.1:1/payouts"

    result = run("reconcile", env={"DATABASE_URL": url})

    assert result.exit_code == 3
    assert result.output.startswith("Error: database unavailable:")
    assert "clean" not in result.output


# --- clients: round trips ---------------------------------------------------


def test_add_stores_a_threshold_client_exactly(run: Run, db: Database) -> None:
    uppercase = "0x" + WALLET[2:].upper()

    result = run(
        *f"clients add --client-id {CLIENT} --open-channel-id={CLIENT_OPEN}"
        f" --strategy threshold --threshold 2.5 --wallet {uppercase}"
        " --currency USDT --network Eth".split()
    )

    assert result.exit_code == 0, result.output
    assert result.output == (
        f"added client {CLIENT}: paid out at 2.5 usd, open channel "
        f"{CLIENT_OPEN}, usdt on eth to {WALLET}\n"
    )
    row = one_client(db, CLIENT)
    assert row["open_channel_id"] == CLIENT_OPEN
    assert row["payout_strategy"] == "threshold"
    assert row["payout_threshold_usd"] == Decimal("2.5")
    assert (row["wallet_address"], row["payout_currency"], row["payout_network"]) == (
        WALLET,
        "usdt",
        "eth",
    )


@pytest.mark.parametrize(
    "id_args",
    [["--client-id", str(CLIENT)], [f"--client-id={CLIENT}"]],
    ids=["separate", "joined"],
)
def test_negative_client_ids_are_values_not_options(
    run: Run, db: Database, id_args: list[str]
) -> None:
    result = run("clients", "add", *id_args, "--strategy", "instant")

    assert result.exit_code == 0, result.output
    assert [row["client_id"] for row in client_rows(db)] == [CLIENT]
    assert one_client(db, CLIENT)["payout_threshold_usd"] is None


def test_list_shows_a_table_and_json_with_amounts_as_strings(
    run: Run, fixture_clients: list[dict[str, Any]]
) -> None:
    table = run("clients", "list")
    machine = run("clients", "list", "--json")

    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == [
        "client_id",
        "open_channel_id",
        "strategy",
        "threshold_usd",
        "wallet",
        "currency",
        "network",
        "updated_at",
    ]
    assert lines[1].split()[:7] == [
        str(CLIENT),
        str(CLIENT_OPEN),
        "threshold",
        "2",
        WALLET,
        "usdt",
        "eth",
    ]
    assert lines[2].split()[:4] == [str(INSTANT), "-", "instant", "-"]
    assert machine.exit_code == 0, machine.output
    listed = json.loads(machine.output)
    assert [client["client_id"] for client in listed] == [CLIENT, INSTANT, OTHER]
    assert listed[0]["payout_threshold_usd"] == "2"
    assert listed[1]["payout_threshold_usd"] is None
    assert listed[2]["payout_threshold_usd"] == "5"
    assert listed[0]["open_channel_id"] == CLIENT_OPEN
    assert listed[0]["wallet_address"] == WALLET


def test_list_of_no_clients(run: Run) -> None:
    assert run("clients", "list").output == "no clients\n"
    assert json.loads(run("clients", "list", "--json").output) == []


def test_set_threshold_changes_it_and_bumps_updated_at(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    old = age_client(db, CLIENT)

    result = run("clients", "set-threshold", f"--client-id={CLIENT}", "3.75")

    assert result.exit_code == 0, result.output
    assert result.output == f"client {CLIENT}: threshold set to 3.75 usd\n"
    row = one_client(db, CLIENT)
    assert row["payout_threshold_usd"] == Decimal("3.75")
    assert row["updated_at"] > old


def test_set_threshold_also_takes_the_threshold_option_as_add_does(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    result = run(
        "clients", "set-threshold", f"--client-id={CLIENT}", "--threshold", "4"
    )
    both = run(
        "clients", "set-threshold", f"--client-id={CLIENT}", "--threshold", "4", "5"
    )

    assert result.exit_code == 0, result.output
    assert one_client(db, CLIENT)["payout_threshold_usd"] == Decimal("4")
    assert both.exit_code == 2
    assert one_client(db, CLIENT)["payout_threshold_usd"] == Decimal("4")


def test_set_threshold_to_the_same_value_changes_nothing(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    old = age_client(db, CLIENT)

    result = run("clients", "set-threshold", "--client-id", str(CLIENT), "2.000")

    assert result.exit_code == 0, result.output
    assert "unchanged" in result.output
    assert one_client(db, CLIENT)["updated_at"] == old


def test_the_largest_threshold_the_column_holds_is_accepted(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    largest = "99999999999999.9999999999"

    result = run("clients", "set-threshold", f"--client-id={CLIENT}", largest)

    assert result.exit_code == 0, result.output
    assert one_client(db, CLIENT)["payout_threshold_usd"] == Decimal(largest)


def test_set_wallet_normalises_and_bumps_updated_at(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    old = age_client(db, INSTANT)
    address = "0x" + "AB12" * 10

    result = run(
        *f"clients set-wallet --client-id {INSTANT} --wallet {address}"
        " --currency USDC --network Base".split()
    )
    again = run(
        *f"clients set-wallet --client-id {INSTANT} --wallet {address.lower()}"
        " --currency usdc --network base".split()
    )

    assert result.exit_code == 0, result.output
    assert result.output == (
        f"client {INSTANT}: paid in usdc on base to {address.lower()}\n"
    )
    assert again.exit_code == 0, again.output
    assert "unchanged" in again.output
    row = one_client(db, INSTANT)
    assert (row["wallet_address"], row["payout_currency"], row["payout_network"]) == (
        address.lower(),
        "usdc",
        "base",
    )
    assert row["updated_at"] > old


def test_set_wallet_accepts_a_non_evm_address_as_given(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    address = "TN3W4H6rK2ce4vX9YnFQHwKENnHjoxb3m9"

    result = run(
        *f"clients set-wallet --client-id={INSTANT} --wallet {address}"
        " --currency usdt --network trx".split()
    )

    assert result.exit_code == 0, result.output
    assert one_client(db, INSTANT)["wallet_address"] == address


def test_a_checksummed_evm_address_is_accepted_and_stored_lowercase(
    run: Run, db: Database, fixture_clients: list[dict[str, Any]]
) -> None:
    result = run(
        *f"clients set-wallet --client-id={INSTANT} --wallet {MIXED_CASE}"
        " --currency usdt --network eth".split()
    )

    assert result.exit_code == 0, result.output
    assert one_client(db, INSTANT)["wallet_address"] == MIXED_CASE.lower()


# --- clients: refusals leave the table as it was ----------------------------

NEW = "-1009000000001"
MIXED_CASE = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # valid EIP-55
# The same address with one letter's case flipped: its checksum fails.
BAD_CHECKSUM = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"


def add(*flags: str) -> tuple[str, ...]:
    return ("clients", "add", *flags)


def add_threshold(*flags: str) -> tuple[str, ...]:
    return add("--client-id", NEW, "--strategy", "threshold", *flags)


def add_with_wallet(address: str, currency: str, network: str) -> tuple[str, ...]:
    codes = f"--currency {currency} --network {network}".split()
    return add_threshold("--threshold", "5", "--wallet", address, *codes)


def set_threshold(client_id: int | str, usd: str) -> tuple[str, ...]:
    return ("clients", "set-threshold", f"--client-id={client_id}", usd)


def set_wallet(client_id: int | str, address: str, network: str) -> tuple[str, ...]:
    command = f"clients set-wallet --client-id {client_id}".split()
    codes = f"--currency usdt --network {network}".split()
    return (*command, "--wallet", address, *codes)


def refusal(name: str, args: tuple[str, ...], exit_code: int, message: str) -> Any:
    return pytest.param(args, exit_code, message, id=name)


REFUSALS = [
    refusal("no threshold", add_threshold(), 2, "needs --threshold USD"),
    refusal(
        "zero threshold",
        add_threshold("--threshold", "0"),
        2,
        "greater than zero",
    ),
    refusal(
        "negative threshold",
        add_threshold("--threshold", "-1"),
        2,
        "greater than zero",
    ),
    refusal(
        "threshold not a number",
        add_threshold("--threshold", "ten"),
        2,
        "must be a decimal number",
    ),
    refusal(
        "threshold beyond 10 places",
        add_threshold("--threshold", "1.00000000001"),
        2,
        "more than 10 decimal places",
    ),
    refusal(
        "threshold too large",
        add_threshold("--threshold", "100000000000000"),
        2,
        "too large",
    ),
    refusal("threshold NaN", add_threshold("--threshold", "NaN"), 2, "decimal number"),
    refusal(
        "threshold under a cent",
        add_threshold("--threshold", "0.0000000001"),
        2,
        "at least 0.01 USD",
    ),
    refusal(
        "an EVM address on tron",
        add_with_wallet(WALLET, "usdt", "trx"),
        2,
        "is not an address on trx",
    ),
    refusal(
        "instant with a threshold",
        add("--client-id", NEW, "--strategy", "instant", "--threshold", "5"),
        2,
        "an instant client is paid per payment: no threshold",
    ),
    refusal(
        "unknown strategy",
        add("--client-id", NEW, "--strategy", "monthly"),
        2,
        "'monthly' is not one of",
    ),
    refusal(
        "wallet alone",
        add_threshold("--threshold", "5", "--wallet", WALLET),
        2,
        "go together; missing --currency, --network",
    ),
    refusal(
        "currency alone",
        add_threshold("--threshold", "5", "--currency", "usdt"),
        2,
        "go together; missing --wallet, --network",
    ),
    refusal(
        "bad currency code",
        add_with_wallet(WALLET, "u$dt", "eth"),
        2,
        "'u$dt' is not a code of 2 to 20 letters or digits",
    ),
    refusal(
        "network code too long",
        add_with_wallet(WALLET, "usdt", "n" * 21),
        2,
        "is not a code of 2 to 20",
    ),
    refusal(
        "short evm address",
        add_with_wallet("0x1234", "usdt", "eth"),
        2,
        "expected 0x followed by 40 hex digits",
    ),
    refusal(
        "evm address without 0x",
        add_with_wallet(WALLET[2:] + "00", "usdt", "bsc"),
        2,
        "is not an address on bsc",
    ),
    refusal(
        "evm address failing its EIP-55 checksum",
        add_with_wallet(BAD_CHECKSUM, "usdt", "matic"),
        2,
        "fails its EIP-55 checksum",
    ),
    refusal(
        "evm zero address",
        add_with_wallet("0x" + "0" * 40, "usdt", "eth"),
        2,
        "the zero address",
    ),
    refusal(
        "other address with a space",
        add_with_wallet("TN3W4H6r K2ce4vX9", "usdt", "trx"),
        2,
        "is not an address",
    ),
    refusal(
        "open channel equal to client id",
        add("--client-id", NEW, f"--open-channel-id={NEW}", "--strategy", "instant"),
        2,
        "the open channel must differ from --client-id",
    ),
    refusal(
        "client id not a number",
        add("--client-id", "-100abc", "--strategy", "instant"),
        2,
        "'-100abc' is not a whole number",
    ),
    refusal(
        "client id beyond bigint",
        add("--client-id=-9223372036854775809", "--strategy", "instant"),
        2,
        "does not fit a BIGINT",
    ),
    refusal(
        "client id zero",
        add("--client-id", "0", "--strategy", "instant"),
        2,
        "0 is not a channel id",
    ),
    refusal(
        "existing client",
        add("--client-id", str(CLIENT), "--strategy", "instant"),
        1,
        f"client {CLIENT} already exists",
    ),
    refusal(
        "another client's open channel",
        add(
            "--client-id",
            NEW,
            "--open-channel-id",
            str(CLIENT_OPEN),
            "--strategy",
            "instant",
        ),
        1,
        f"open channel id {CLIENT_OPEN} belongs to client {CLIENT}",
    ),
    refusal(
        "open channel that is a client's id",
        add(
            "--client-id", NEW, "--open-channel-id", str(OTHER), "--strategy", "instant"
        ),
        1,
        f"open channel id {OTHER} is already a client id",
    ),
    refusal(
        "client id that is an open channel",
        add("--client-id", "-1002000000002", "--strategy", "instant"),
        1,
        f"client id -1002000000002 is the open channel of client {OTHER}",
    ),
    refusal(
        "threshold for an instant client",
        set_threshold(INSTANT, "7"),
        1,
        "is an instant client, paid per payment",
    ),
    refusal(
        "threshold for an unknown client",
        set_threshold(-42, "7"),
        1,
        "no client -42",
    ),
    refusal(
        "set threshold to zero",
        set_threshold(CLIENT, "0"),
        2,
        "greater than zero",
    ),
    refusal(
        "set a negative threshold",
        ("clients", "set-threshold", "--client-id", str(CLIENT), "-5"),
        2,
        "greater than zero",
    ),
    refusal(
        "set a threshold beyond 10 places",
        set_threshold(CLIENT, "0.00000000001"),
        2,
        "more than 10 decimal places",
    ),
    refusal(
        "wallet for an unknown client",
        set_wallet(-42, WALLET, "eth"),
        1,
        "no client -42",
    ),
    refusal(
        "set a wallet failing its checksum",
        set_wallet(CLIENT, BAD_CHECKSUM, "eth"),
        2,
        "fails its EIP-55 checksum",
    ),
    refusal(
        "set a wallet on a bad network code",
        set_wallet(CLIENT, WALLET, "e"),
        2,
        "'e' is not a code",
    ),
]


@pytest.mark.parametrize(("args", "exit_code", "message"), REFUSALS)
def test_refusals_explain_and_write_nothing(
    run: Run,
    db: Database,
    fixture_clients: list[dict[str, Any]],
    args: tuple[str, ...],
    exit_code: int,
    message: str,
) -> None:
    before = client_rows(db)

    result = run(*args)

    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert client_rows(db) == before


# --- clients: concurrent adds -----------------------------------------------


def test_concurrent_adds_of_one_open_channel_leave_exactly_one(db: Database) -> None:
    open_channel = -1002000000777
    contenders = [-1009000000000 - n for n in range(8)]
    start = threading.Barrier(len(contenders))
    outcomes: dict[int, str] = {}

    def attempt(client_id: int) -> None:
        client = clients.NewClient(client_id, open_channel, "instant", None, None)
        start.wait()
        try:
            with db.transaction() as cur:
                clients.add(cur, client)
            outcomes[client_id] = "added"
        except clients.Refused as error:
            outcomes[client_id] = str(error)

    threads = [threading.Thread(target=attempt, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    winners = [c for c, outcome in outcomes.items() if outcome == "added"]
    assert len(outcomes) == len(contenders)
    assert len(winners) == 1
    for client_id, outcome in outcomes.items():
        if client_id != winners[0]:
            expected = f"open channel id {open_channel} belongs to client {winners[0]}"
            assert outcome == expected
    assert [row["client_id"] for row in client_rows(db)] == winners


def test_an_add_waits_for_a_concurrent_add_and_sees_its_open_channel(
    database_url: str, db: Database
) -> None:
    # No constraint spans two rows: only the lock stops client B taking, as
    # its own id, the open channel that client A is adding right now.
    channel = -1002000000888
    first = clients.NewClient(-1009000000001, channel, "instant", None, None)
    second = clients.NewClient(channel, None, "instant", None, None)
    holder = psycopg2.connect(database_url)
    outcome: list[str] = []

    def add_second() -> None:
        try:
            with db.transaction() as cur:
                clients.add(cur, second)
            outcome.append("added")
        except clients.Refused as error:
            outcome.append(str(error))

    try:
        clients.add(holder.cursor(cursor_factory=RealDictCursor), first)
        thread = threading.Thread(target=add_second)
        thread.start()
        assert _waits_for_clients_lock(db), "the second add did not wait"
        holder.commit()
        thread.join(timeout=30)
    finally:
        holder.close()

    assert outcome == [
        f"client id {channel} is the open channel of client {first.client_id}"
    ]
    assert [row["client_id"] for row in client_rows(db)] == [first.client_id]


def _waits_for_clients_lock(db: Database, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with db.transaction() as cur:
            cur.execute(
                "SELECT count(*) AS waiting FROM pg_locks"
                " WHERE relation = 'clients'::regclass AND NOT granted"
            )
            row = cur.fetchone()
        assert row is not None
        if row["waiting"]:
            return True
        time.sleep(0.02)
    return False


# --- reconcile --------------------------------------------------------------

FAILED_CONVERSION = uuid.UUID("00000000-0000-4000-8000-0000000c0f00")
CONVERSION = uuid.UUID("00000000-0000-4000-8000-0000000c0c00")
FAILED_PAYOUT = uuid.UUID("00000000-0000-4000-8000-0000000b0f00")
PAYOUT = uuid.UUID("00000000-0000-4000-8000-0000000b0c00")


@dataclass(frozen=True)
class Ledger:
    """A consistent history: ids of its rows by payment id."""

    rows: dict[str, int]
    events: dict[str, int]


def credit(
    cur: RealDictCursor,
    payment_id: str,
    crypto: str,
    net_usd: str,
    *,
    delivery_for: str | None = None,
) -> int:
    """A pending row at a 3 % fee, and its delivery unless told otherwise."""
    net = Decimal(net_usd)
    cur.execute(
        """
        INSERT INTO payout_accumulation (nowpayments_payment_id, client_id,
            user_id, payment_amount_usd, usd_source, platform_fee_percent,
            accumulated_usd, accumulated_eth, outcome_currency)
        VALUES (%s, %s, 42, %s, 'price', 3, %s, %s, 'eth')
        RETURNING id
        """,
        (payment_id, CLIENT, net / Decimal("0.97"), net, Decimal(crypto)),
    )
    row_id = int(cur.fetchone()["id"])
    if delivery_for is not None:
        deliver(cur, delivery_for, "accumulated", row_id)
    return row_id


def deliver(
    cur: RealDictCursor, payment_id: str, outcome: str, row_id: int | None
) -> int:
    body = json.dumps({"payment_id": payment_id}).encode()
    cur.execute(
        """
        INSERT INTO ipn_events (source, payment_id, payment_status,
            signature_valid, outcome, http_status, accumulation_id, raw_body,
            body_size)
        VALUES ('ipn', %s, 'finished', true, %s, 200, %s, %s, %s)
        RETURNING id
        """,
        (payment_id, outcome, row_id, body, len(body)),
    )
    return int(cur.fetchone()["id"])


def conversion(
    cur: RealDictCursor,
    batch_id: uuid.UUID,
    status: str,
    members: dict[int, str],
    received: str | None = None,
) -> None:
    finished = status in ("completed", "failed")
    cur.execute(
        """
        INSERT INTO batch_conversions (batch_conversion_id, outcome_currency,
            status, row_count, total_usd, total_eth, threshold_usd,
            actual_usdt_received, finished_at)
        VALUES (%s, 'eth', %s, %s, 1, %s, 50, %s,
                CASE WHEN %s THEN now() END)
        """,
        (
            str(batch_id),
            status,
            len(members),
            sum(Decimal(eth) for eth in members.values()),
            received,
            finished,
        ),
    )
    for row_id, eth in members.items():
        cur.execute(
            "INSERT INTO batch_conversion_members VALUES (%s, %s, %s, 1)",
            (str(batch_id), row_id, eth),
        )


def payout(
    cur: RealDictCursor, batch_id: uuid.UUID, status: str, members: dict[int, str]
) -> None:
    finished = status in ("completed", "failed")
    cur.execute(
        """
        INSERT INTO payout_batches (batch_id, client_id, wallet_address,
            payout_currency, payout_network, total_usdt, row_count, status,
            finished_at)
        VALUES (%s, %s, %s, 'usdt', 'eth', %s, %s, %s,
                CASE WHEN %s THEN now() END)
        """,
        (
            str(batch_id),
            CLIENT,
            WALLET,
            sum(Decimal(usdt) for usdt in members.values()),
            len(members),
            status,
            finished,
        ),
    )
    for row_id, usdt in members.items():
        cur.execute(
            "INSERT INTO payout_batch_members VALUES (%s, %s, %s)",
            (str(batch_id), row_id, usdt),
        )


def convert(
    cur: RealDictCursor, row_id: int, batch_id: uuid.UUID, net: str, fee: str
) -> None:
    cur.execute(
        """
        UPDATE payout_accumulation
        SET conversion_status = 'converted', batch_conversion_id = %s,
            accumulated_usdt = %s, platform_fee_usdt = %s
        WHERE id = %s
        """,
        (str(batch_id), net, fee, row_id),
    )


def mark_paid(cur: RealDictCursor, row_id: int, batch_id: uuid.UUID) -> None:
    cur.execute(
        """
        UPDATE payout_accumulation
        SET payout_batch_id = %s, is_paid_out = true, paid_out_at = now()
        WHERE id = %s
        """,
        (str(batch_id), row_id),
    )


@pytest.fixture
def ledger(db: Database, fixture_clients: list[dict[str, Any]]) -> Ledger:
    """Three payments; two went through a failed and then a completed
    conversion, and a failed and then a completed payout; one is pending."""
    with db.transaction() as cur:
        rows = {
            "np-1": credit(cur, "np-1", "0.01", "32.98", delivery_for="np-1"),
            "np-2": credit(cur, "np-2", "0.02", "65.96", delivery_for="np-2"),
            "np-3": credit(cur, "np-3", "0.005", "16.49", delivery_for="np-3"),
        }
        # A repeated delivery is recorded but credits nothing.
        deliver(cur, "np-1", "duplicate", None)
        first, second = rows["np-1"], rows["np-2"]
        conversion(cur, FAILED_CONVERSION, "failed", {first: "0.01", second: "0.02"})
        conversion(cur, CONVERSION, "completed", {first: "0.01", second: "0.02"}, "102")
        # 102 USDT received, shared 1:2, and 3 % of each share kept as fee.
        convert(cur, first, CONVERSION, "32.98", "1.02")
        convert(cur, second, CONVERSION, "65.96", "2.04")
        payout(cur, FAILED_PAYOUT, "failed", {first: "32.98"})
        payout(cur, PAYOUT, "completed", {first: "32.98", second: "65.96"})
        mark_paid(cur, first, PAYOUT)
        mark_paid(cur, second, PAYOUT)
        cur.execute(
            "SELECT payment_id, id FROM ipn_events WHERE outcome = 'accumulated'"
        )
        events = {row["payment_id"]: row["id"] for row in cur.fetchall()}
    return Ledger(rows, events)


def execute(db: Database, statement: str, *params: Any) -> None:
    with db.transaction() as cur:
        cur.execute(statement, params)


def breach_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("invariant")]


def test_reconcile_is_clean_on_an_empty_database(run: Run) -> None:
    result = run("reconcile")

    assert result.exit_code == 0, result.output
    assert result.output == (
        "reconcile: clean: invariants 1-6 hold over 0 rows, 0 conversions, "
        "0 payout batches, 0 deliveries\n"
    )


def test_reconcile_is_clean_on_a_consistent_history(run: Run, ledger: Ledger) -> None:
    result = run("reconcile")

    assert result.exit_code == 0, result.output
    assert result.output == (
        "reconcile: clean: invariants 1-6 hold over 3 rows, 2 conversions, "
        "2 payout batches, 4 deliveries\n"
    )


def test_reconcile_flags_two_credited_deliveries_of_one_payment(
    run: Run, db: Database, ledger: Ledger
) -> None:
    with db.transaction() as cur:
        extra = credit(cur, "np-4", "0.005", "16.49")
        event = deliver(cur, "np-1", "accumulated", extra)
    first = ledger.rows["np-1"]

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 1: payment np-1 has 2 'accumulated' deliveries: ipn_events "
        f"{ledger.events['np-1']}, {event} crediting rows {first}, {extra} "
        "(32.98 usd, 16.49 usd)",
        f"invariant 6: row {extra} (payment np-4, client {CLIENT}, 0.005 eth, "
        f"16.49 usd) is linked to ipn_events {event}, a delivery of payment np-1",
    ]
    assert result.output.splitlines()[-1].startswith(
        "reconcile: 2 breaches (invariant 1: 1, invariant 6: 1) over 4 rows"
    )


def test_the_schema_refuses_a_second_row_for_a_payment(
    db: Database, ledger: Ledger
) -> None:
    with pytest.raises(psycopg2.errors.UniqueViolation), db.transaction() as cur:
        credit(cur, "np-3", "0.005", "16.49")


def test_reconcile_query_flags_a_payment_credited_by_two_rows(
    database_url: str, ledger: Ledger
) -> None:
    conn = psycopg2.connect(database_url)
    try:
        cur = conn.cursor(cursor_factory=RealDictCursor)
        cur.execute(
            "ALTER TABLE payout_accumulation"
            " DROP CONSTRAINT payout_accumulation_nowpayments_payment_id_key"
        )
        twin = credit(cur, "np-3", "0.005", "16.49")
        lines = [breach.line for breach in reconcile.find_breaches(cur)]
    finally:
        conn.rollback()
        conn.close()

    assert lines == [
        f"invariant 1: payment np-3 is credited by rows {ledger.rows['np-3']}, "
        f"{twin} (16.49 usd, 16.49 usd)",
        f"invariant 6: row {twin} (payment np-3, client {CLIENT}, 0.005 eth, "
        "16.49 usd) has no 'accumulated' delivery in ipn_events",
    ]


def test_reconcile_flags_a_row_in_two_live_conversions(
    run: Run, db: Database, ledger: Ledger
) -> None:
    another = uuid.UUID("00000000-0000-4000-8000-0000000c0a00")
    first = ledger.rows["np-1"]
    with db.transaction() as cur:
        conversion(cur, another, "claimed", {first: "0.01"})

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 2: row {first} is in 2 conversions that have not failed: "
        f"{CONVERSION} completed (0.01 eth), {another} claimed (0.01 eth)"
    ]
    assert "reconcile: 1 breach (invariant 2: 1)" in result.output


def test_reconcile_flags_a_row_in_two_live_payout_batches(
    run: Run, db: Database, ledger: Ledger
) -> None:
    another = uuid.UUID("00000000-0000-4000-8000-0000000b0a00")
    second = ledger.rows["np-2"]
    with db.transaction() as cur:
        payout(cur, another, "sent", {second: "65.96"})

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 2: row {second} is in 2 payout batches that have not "
        f"failed: {PAYOUT} completed (65.96 usdt), {another} sent (65.96 usdt)",
        f"invariant 4: payout batch {another} (sent) total_usdt 65.96 but the "
        "0 rows claimed by it hold 0",
    ]


def test_reconcile_flags_a_conversion_whose_rows_miss_a_usdt_unit(
    run: Run, db: Database, ledger: Ledger
) -> None:
    execute(
        db,
        "UPDATE payout_accumulation SET platform_fee_usdt = 2.039999 WHERE id = %s",
        ledger.rows["np-2"],
    )

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 3: conversion {CONVERSION} received 102 usdt but its 2 rows "
        "hold 101.999999 (net 98.94 + fee 3.059999)"
    ]


def test_reconcile_flags_a_completed_conversion_holding_a_row_without_usdt(
    run: Run, db: Database, ledger: Ledger
) -> None:
    execute(
        db,
        "UPDATE payout_accumulation SET conversion_status = 'swapping',"
        " batch_conversion_id = %s WHERE id = %s",
        str(CONVERSION),
        ledger.rows["np-3"],
    )

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 3: conversion {CONVERSION} received 102 usdt but its 3 rows "
        "hold 102 (net 98.94 + fee 3.06); 1 row without usdt"
    ]


def test_reconcile_flags_a_payout_total_that_differs_from_its_rows(
    run: Run, db: Database, ledger: Ledger
) -> None:
    execute(
        db,
        "UPDATE payout_batches SET total_usdt = 98.940001 WHERE batch_id = %s",
        str(PAYOUT),
    )

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    batch = f"invariant 4: payout batch {PAYOUT} (completed) total_usdt 98.940001"
    assert breach_lines(result) == [
        f"{batch} but its 2 members sum to 98.94",
        f"{batch} but the 2 rows claimed by it hold 98.94",
    ]


def test_reconcile_flags_rows_whose_usdt_changed_after_their_payout(
    run: Run, db: Database, ledger: Ledger
) -> None:
    # Net and fee move together, so the conversion still adds up.
    first = ledger.rows["np-1"]
    execute(
        db,
        "UPDATE payout_accumulation SET accumulated_usdt = 32.97,"
        " platform_fee_usdt = 1.03 WHERE id = %s",
        first,
    )

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 4: payout batch {PAYOUT} (completed) members recorded "
        f"98.94 usdt but their rows hold 98.93 now; rows {first} changed",
        f"invariant 4: payout batch {PAYOUT} (completed) total_usdt 98.94 but "
        "the 2 rows claimed by it hold 98.93",
        f"invariant 4: payout batch {FAILED_PAYOUT} (failed) members recorded "
        f"32.98 usdt but their rows hold 32.97 now; rows {first} changed",
    ]


def test_reconcile_flags_a_row_paid_before_its_conversion_completed(
    run: Run, db: Database, ledger: Ledger
) -> None:
    swapping = uuid.UUID("00000000-0000-4000-8000-0000000c0500")
    paid = uuid.UUID("00000000-0000-4000-8000-0000000b0500")
    third = ledger.rows["np-3"]
    with db.transaction() as cur:
        conversion(cur, swapping, "swapping", {third: "0.005"})
        convert(cur, third, swapping, "16.49", "0.51")
        payout(cur, paid, "completed", {third: "16.49"})
        mark_paid(cur, third, paid)

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 5: row {third} (client {CLIENT}) is paid in payout batch "
        f"{paid} but not converted: conversion_status converted, "
        f"accumulated_usdt 16.49, conversion {swapping} swapping"
    ]


def test_the_schema_refuses_paying_a_pending_row(db: Database, ledger: Ledger) -> None:
    with pytest.raises(psycopg2.errors.CheckViolation), db.transaction() as cur:
        mark_paid(cur, ledger.rows["np-3"], PAYOUT)


def test_reconcile_query_flags_a_pending_row_marked_paid(
    database_url: str, ledger: Ledger
) -> None:
    third = ledger.rows["np-3"]
    conn = psycopg2.connect(database_url)
    try:
        cur = conn.cursor(cursor_factory=RealDictCursor)
        cur.execute(
            "ALTER TABLE payout_accumulation"
            " DROP CONSTRAINT payout_accumulation_payout_needs_usdt"
        )
        mark_paid(cur, third, PAYOUT)
        lines = [breach.line for breach in reconcile.find_breaches(cur)]
    finally:
        conn.rollback()
        conn.close()

    assert lines == [
        f"invariant 5: row {third} (client {CLIENT}) is paid in payout batch "
        f"{PAYOUT} but not converted: conversion_status pending, "
        "accumulated_usdt none, conversion none"
    ]


def test_reconcile_flags_a_row_without_its_delivery(
    run: Run, db: Database, ledger: Ledger
) -> None:
    third = ledger.rows["np-3"]
    execute(db, "DELETE FROM ipn_events WHERE accumulation_id = %s", third)

    result = run("reconcile")

    assert result.exit_code == 1, result.output
    assert breach_lines(result) == [
        f"invariant 6: row {third} (payment np-3, client {CLIENT}, 0.005 eth, "
        "16.49 usd) has no 'accumulated' delivery in ipn_events"
    ]
    assert result.output.splitlines()[-1] == (
        "reconcile: 1 breach (invariant 6: 1) over 3 rows, 2 conversions, "
        "2 payout batches, 3 deliveries"
    )
