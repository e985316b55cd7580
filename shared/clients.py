"""Clients (channel owners) as the operator manages them with payoutctl.

Input is checked in full before a transaction opens, so a refused command
writes nothing. What only the database can tell (the client exists, a
channel id is taken) is checked inside the transaction that writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import psycopg2.errors
from Crypto.Hash import keccak
from psycopg2.extras import RealDictCursor

from shared import money
from shared.db import load_queries

# payoutctl's named SQL, shared with shared.reconcile.
QUERIES = load_queries(Path(__file__).with_name("queries.sql"))

Strategy = Literal["threshold", "instant"]

BIGINT_MIN = -(2**63)
BIGINT_MAX = 2**63 - 1

# Network codes (NOWPayments' and the common long names) whose addresses
# are Ethereum-style: 0x and 20 bytes in hex. A code missing here only gets
# the loose check of other chains; one wrongly here refuses good addresses,
# never accepts bad ones.
EVM_NETWORKS = frozenset((
    "eth", "ethereum", "bsc", "opbnb", "matic", "polygon", "arbitrum", "arb",
    "optimism", "op", "base", "avax", "avaxc", "ftm", "fantom", "celo",
    "linea", "zksync", "scroll", "cronos", "gnosis", "xdai", "mantle", "blast",
))  # fmt: skip

_CHANNEL_ID = re.compile(r"-?[0-9]{1,30}")
_CODE = re.compile(r"[a-z0-9]{2,20}")
_EVM_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
# Other chains' formats vary too much to check here (base58, bech32, TON's
# base64url, a "prefix:" form); this only keeps out blanks and junk.
_OTHER_ADDRESS = re.compile(r"[\x21-\x7e]{8,128}")
# Networks whose address shape is fixed and easy to tell from an EVM one:
# money sent to an address of another chain's shape is lost.
_NETWORK_ADDRESS = {
    "trx": re.compile(r"T[1-9A-HJ-NP-Za-km-z]{33}"),
    "tron": re.compile(r"T[1-9A-HJ-NP-Za-km-z]{33}"),
    "btc": re.compile(r"(bc1[02-9ac-hj-np-z]{11,71}|[13][1-9A-HJ-NP-Za-km-z]{25,34})"),
    "sol": re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,44}"),
}
MIN_THRESHOLD_USD = Decimal("0.01")


class InvalidInput(ValueError):
    """Input refused before anything is written.

    ``option`` names the flag at fault, or is None when the fault lies in
    how flags combine.
    """

    def __init__(self, option: str | None, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


class Refused(Exception):
    """What the database holds forbids the change."""


@dataclass(frozen=True)
class Wallet:
    address: str
    currency: str
    network: str


@dataclass(frozen=True)
class NewClient:
    client_id: int
    open_channel_id: int | None
    strategy: Strategy
    threshold_usd: Decimal | None
    wallet: Wallet | None

    def params(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "open_channel_id": self.open_channel_id,
            "payout_strategy": self.strategy,
            "payout_threshold_usd": self.threshold_usd,
            **_wallet_params(self.wallet),
        }


# --- checking input ---------------------------------------------------------


def parse_channel_id(text: str, option: str) -> int:
    """A channel id: a non-zero BIGINT, negative for Telegram channels."""
    text = text.strip()
    if not _CHANNEL_ID.fullmatch(text):
        raise InvalidInput(option, f"{text!r} is not a whole number")
    value = int(text)
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise InvalidInput(option, f"{value} does not fit a BIGINT")
    if value == 0:
        raise InvalidInput(option, "0 is not a channel id")
    return value


def parse_threshold(text: str, option: str = "--threshold") -> Decimal:
    """A payout threshold in USD: > 0 and exactly what NUMERIC(24,10) holds."""
    try:
        amount = money.exact(money.parse_amount(text, "threshold"), money.USD)
    except money.AmountError as error:
        raise InvalidInput(option, f"{text!r}: {error}") from None
    if amount <= 0:
        raise InvalidInput(option, "the threshold must be greater than zero")
    if amount < MIN_THRESHOLD_USD:
        # Below a cent every converted payment would be paid out on its own:
        # a zero threshold in all but name, spending fees on dust.
        raise InvalidInput(
            option, f"the threshold must be at least {MIN_THRESHOLD_USD} USD"
        )
    return amount


def parse_code(text: str, option: str) -> str:
    """A currency or network code, lowercased: 2 to 20 letters or digits."""
    code = text.strip().lower()
    if not _CODE.fullmatch(code):
        raise InvalidInput(
            option, f"{text!r} is not a code of 2 to 20 letters or digits"
        )
    return code


def parse_wallet(address: str, currency: str, network: str) -> Wallet:
    currency = parse_code(currency, "--currency")
    network = parse_code(network, "--network")
    address = address.strip()
    if network in EVM_NETWORKS:
        address = _evm_address(address, network)
    elif network in _NETWORK_ADDRESS:
        if not _NETWORK_ADDRESS[network].fullmatch(address):
            raise InvalidInput(
                "--wallet", f"{address!r} is not an address on {network}"
            )
    elif not _OTHER_ADDRESS.fullmatch(address):
        raise InvalidInput(
            "--wallet",
            f"{address!r} is not an address: 8 to 128 printable characters, no spaces",
        )
    return Wallet(address, currency, network)


def _evm_address(address: str, network: str) -> str:
    if not _EVM_ADDRESS.fullmatch(address):
        raise InvalidInput(
            "--wallet",
            f"{address!r} is not an address on {network}: expected 0x "
            "followed by 40 hex digits",
        )
    digits = address[2:]
    # Mixed case carries an EIP-55 checksum: verify it, so a mistyped
    # character is caught before money is sent there. One case carries none.
    mixed = digits != digits.lower() and digits != digits.upper()
    if mixed and digits != eip55_digits(digits):
        raise InvalidInput(
            "--wallet",
            f"{address} fails its EIP-55 checksum: a character is wrong; "
            "copy the address again from the wallet",
        )
    if int(digits, 16) == 0:
        raise InvalidInput("--wallet", "the zero address burns what it gets")
    return "0x" + digits.lower()


def eip55_digits(digits: str) -> str:
    """The 40 hex digits of an address in EIP-55 checksum case."""
    lower = digits.lower()
    hashed = keccak.new(digest_bits=256, data=lower.encode("ascii")).hexdigest()
    return "".join(
        char.upper() if int(nibble, 16) >= 8 else char
        for char, nibble in zip(lower, hashed[:40], strict=True)
    )


def optional_wallet(
    address: str | None, currency: str | None, network: str | None
) -> Wallet | None:
    """The wallet when all three parts are given, None when none is."""
    given = {"--wallet": address, "--currency": currency, "--network": network}
    missing = [option for option, value in given.items() if value is None]
    if len(missing) == len(given):
        return None
    if missing:
        raise InvalidInput(
            None,
            "--wallet, --currency and --network go together; missing "
            + ", ".join(missing),
        )
    assert address is not None and currency is not None and network is not None
    return parse_wallet(address, currency, network)


def new_client(
    client_id: int,
    open_channel_id: int | None,
    strategy: Strategy,
    threshold_text: str | None,
    wallet: Wallet | None,
) -> NewClient:
    """Check the parts of ``clients add`` against each other."""
    if open_channel_id == client_id:
        raise InvalidInput(
            "--open-channel-id", "the open channel must differ from --client-id"
        )
    threshold = None
    if strategy == "threshold":
        if threshold_text is None:
            raise InvalidInput(
                "--threshold", "a threshold client needs --threshold USD"
            )
        threshold = parse_threshold(threshold_text)
    elif threshold_text is not None:
        raise InvalidInput(
            "--threshold", "an instant client is paid per payment: no threshold"
        )
    return NewClient(client_id, open_channel_id, strategy, threshold, wallet)


# --- the database -----------------------------------------------------------


def add(cur: RealDictCursor, client: NewClient) -> None:
    """Insert a new client; refuse an existing one or a channel id clash."""
    cur.execute(QUERIES["lock_clients"])
    cur.execute(QUERIES["channel_id_clashes"], client.params())
    clashes = [_clash(client, row) for row in cur.fetchall()]
    if clashes:
        raise Refused("; ".join(clashes))

    try:
        cur.execute(QUERIES["insert_client"], client.params())
    except psycopg2.errors.UniqueViolation:
        # Only a writer that skipped the lock can get here.
        raise Refused(
            f"client {client.client_id} or its open channel was added "
            "meanwhile; list the clients and try again"
        ) from None


def _clash(client: NewClient, row: Mapping[str, Any]) -> str:
    other = row["client_id"]
    if other == client.client_id:
        return (
            f"client {other} already exists; change it with set-threshold or set-wallet"
        )
    if row["open_channel_id"] == client.client_id:
        return f"client id {client.client_id} is the open channel of client {other}"
    if other == client.open_channel_id:
        return f"open channel id {other} is already a client id"
    return f"open channel id {client.open_channel_id} belongs to client {other}"


def list_all(cur: RealDictCursor) -> list[dict[str, Any]]:
    cur.execute(QUERIES["list_clients"])
    return [dict(row) for row in cur.fetchall()]


def set_threshold(cur: RealDictCursor, client_id: int, threshold: Decimal) -> bool:
    """Change a threshold client's threshold; return whether it changed."""
    strategy = _lock_client(cur, client_id)
    if strategy != "threshold":
        raise Refused(
            f"client {client_id} is an {strategy} client, paid per payment: "
            "it has no threshold"
        )
    cur.execute(
        QUERIES["set_threshold"],
        {"client_id": client_id, "payout_threshold_usd": threshold},
    )
    return bool(cur.rowcount)


def set_wallet(cur: RealDictCursor, client_id: int, wallet: Wallet) -> bool:
    """Change where a client is paid; return whether it changed.

    Payout batches copy the wallet when they claim rows, so a batch already
    on its way still pays the wallet it was created with.
    """
    _lock_client(cur, client_id)
    cur.execute(
        QUERIES["set_wallet"], {"client_id": client_id, **_wallet_params(wallet)}
    )
    return bool(cur.rowcount)


def _lock_client(cur: RealDictCursor, client_id: int) -> str:
    """Lock the client's row until the transaction ends; return its strategy."""
    cur.execute(QUERIES["client_for_update"], {"client_id": client_id})
    row = cur.fetchone()
    if row is None:
        raise Refused(f"no client {client_id}; add it with `clients add`")
    return str(row["payout_strategy"])


def _wallet_params(wallet: Wallet | None) -> dict[str, str | None]:
    return {
        "wallet_address": wallet.address if wallet else None,
        "payout_currency": wallet.currency if wallet else None,
        "payout_network": wallet.network if wallet else None,
    }


def as_json(client: Mapping[str, Any]) -> dict[str, Any]:
    """A client for JSON output: amounts as strings, times in ISO 8601."""
    threshold = client["payout_threshold_usd"]
    return {
        "client_id": client["client_id"],
        "open_channel_id": client["open_channel_id"],
        "payout_strategy": client["payout_strategy"],
        "payout_threshold_usd": (
            None if threshold is None else money.to_text(threshold)
        ),
        "wallet_address": client["wallet_address"],
        "payout_currency": client["payout_currency"],
        "payout_network": client["payout_network"],
        "created_at": client["created_at"].isoformat(),
        "updated_at": client["updated_at"].isoformat(),
    }


def as_table(clients: Sequence[Mapping[str, Any]]) -> str:
    """Clients as aligned columns, ids and amounts right-aligned."""
    headers = (
        "client_id",
        "open_channel_id",
        "strategy",
        "threshold_usd",
        "wallet",
        "currency",
        "network",
        "updated_at",
    )
    right = {0, 1, 3}
    lines = [headers] + [_table_cells(client) for client in clients]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _table_cells(client: Mapping[str, Any]) -> tuple[str, ...]:
    def text(value: Any) -> str:
        return "-" if value is None else str(value)

    threshold = client["payout_threshold_usd"]
    return (
        str(client["client_id"]),
        text(client["open_channel_id"]),
        client["payout_strategy"],
        "-" if threshold is None else money.to_text(threshold),
        text(client["wallet_address"]),
        text(client["payout_currency"]),
        text(client["payout_network"]),
        client["updated_at"].strftime("%Y-%m-%d %H:%M:%SZ"),
    )
