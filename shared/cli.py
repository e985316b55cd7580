"""payoutctl, the operator's command (DESIGN.md section 7).

The database is ``DATABASE_URL``'s, else the embedded development server.
Exit status: 0 done (reconcile: clean); 1 refused because of what the
database holds (reconcile: a breach; run: the service refused or failed the
run); 2 bad usage, input or configuration; 3 the database or the service
cannot be reached.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, NoReturn

import click
import psycopg2

from shared import (
    clients,
    money,
    reconcile,
    release,
    replay,
    scheduler_sync,
    schema,
    smoke,
    status,
    trigger,
)
from shared.config import Config, ConfigError, Settings, load_config
from shared.db import Database, DatabaseUnavailable
from shared.embedded import resolve_database_url


class ConfigurationProblem(click.ClickException):
    exit_code = 2


class DatabaseDown(click.ClickException):
    exit_code = 3


class ServiceDown(click.ClickException):
    exit_code = 3


class Runtime:
    """What commands share, set up on first use so ``--help`` needs nothing."""

    def __init__(self) -> None:
        # Tests give ID tokens of their own; None: Google's credentials.
        self.token_source: smoke.TokenSource | None = None
        self._config: Config | None = None
        self._url: str | None = None
        self._database: Database | None = None

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config("payoutctl")
            except ConfigError as error:
                raise ConfigurationProblem(str(error)) from None
        return self._config

    @property
    def settings(self) -> Settings:
        return self.config().settings

    def database_url(self) -> str:
        if self._url is None:
            try:
                self._url = resolve_database_url(self.settings.database_url)
            except RuntimeError as error:  # the embedded server is not installed
                raise ConfigurationProblem(str(error)) from None
        return self._url

    def database(self) -> Database:
        """The pool, on a schema this code knows."""
        if self._database is None:
            url = self.database_url()
            try:
                schema.require_current(url)
            except schema.SchemaOutdated as error:
                raise ConfigurationProblem(str(error)) from None
            # An operator's command reads the whole database: it may take
            # longer than a request does.
            timeout_ms = self.settings.db_statement_timeout_ms or 120_000
            self._database = Database(
                url,
                size=2,
                statement_timeout_ms=timeout_ms,
                application_name="payoutctl",
            )
        return self._database

    def close(self) -> None:
        if self._database is not None:
            self._database.close()


class PayoutctlGroup(click.Group):
    """Turns the errors every command can meet into messages and statuses."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except clients.Refused as error:
            raise click.ClickException(str(error)) from None
        except ConfigError as error:
            raise ConfigurationProblem(str(error)) from None
        except trigger.Unreachable as error:
            raise ServiceDown(str(error)) from None
        except (DatabaseUnavailable, psycopg2.OperationalError) as error:
            reason = str(error).strip() or type(error).__name__
            raise DatabaseDown(f"database unavailable: {reason}") from None


def channel_id(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | None:
    """Read a BIGINT channel id; click hands over ``-100...`` as a value."""
    if value is None:
        return None
    option = param.opts[0] if param.opts else "ID"
    try:
        return clients.parse_channel_id(value, option)
    except clients.InvalidInput as error:
        raise click.BadParameter(error.message, ctx, param) from None


def _bad_input(error: clients.InvalidInput) -> NoReturn:
    if error.option is None:
        raise click.UsageError(error.message) from None
    raise click.BadParameter(error.message, param_hint=error.option) from None


@click.group(cls=PayoutctlGroup)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Operate the payout accumulation suite."""
    runtime = ctx.ensure_object(Runtime)
    ctx.call_on_close(runtime.close)


@main.command()
@click.pass_obj
def migrate(runtime: Runtime) -> None:
    """Apply the schema migrations the database lacks."""
    applied = schema.migrate(runtime.database_url())
    if applied:
        click.echo(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        click.echo("schema is current: no migration to apply")


@main.command("reconcile")
@click.pass_context
def reconcile_command(ctx: click.Context) -> None:
    """Check the invariants; exit 1 when one is broken."""
    runtime: Runtime = ctx.obj
    report = reconcile.run(runtime.database())
    for breach in report.breaches:
        click.echo(breach.line)
    click.echo(report.summary())
    if not report.clean:
        ctx.exit(1)


@main.group("clients")
def clients_command() -> None:
    """Add, list and change clients (channel owners)."""


@clients_command.command("add")
@click.option(
    "--client-id",
    metavar="ID",
    callback=channel_id,
    required=True,
    help="The paid channel id (negative for Telegram channels).",
)
@click.option(
    "--open-channel-id", metavar="ID", callback=channel_id, help="The free channel id."
)
@click.option(
    "--strategy",
    type=click.Choice(["threshold", "instant"]),
    required=True,
    help="Pay when the threshold is reached, or per payment.",
)
@click.option(
    "--threshold",
    "threshold_text",
    metavar="USD",
    help="Payout threshold in USD (threshold clients only).",
)
@click.option("--wallet", metavar="ADDRESS", help="Where payouts go.")
@click.option("--currency", metavar="CODE", help="Payout currency, e.g. usdt.")
@click.option("--network", metavar="CODE", help="Payout network, e.g. eth.")
@click.pass_obj
def add_client(
    runtime: Runtime,
    client_id: int,
    open_channel_id: int | None,
    strategy: clients.Strategy,
    threshold_text: str | None,
    wallet: str | None,
    currency: str | None,
    network: str | None,
) -> None:
    """Add a client; an existing one is refused, never updated."""
    try:
        payout_wallet = clients.optional_wallet(wallet, currency, network)
        client = clients.new_client(
            client_id, open_channel_id, strategy, threshold_text, payout_wallet
        )
    except clients.InvalidInput as error:
        _bad_input(error)

    with runtime.database().transaction() as cur:
        clients.add(cur, client)

    click.echo(f"added client {client.client_id}: {_describe(client)}")


def _describe(client: clients.NewClient) -> str:
    if client.threshold_usd is None:
        parts = ["paid per payment"]
    else:
        parts = [f"paid out at {money.to_text(client.threshold_usd)} usd"]
    if client.open_channel_id is not None:
        parts.append(f"open channel {client.open_channel_id}")
    if client.wallet is None:
        parts.append("no wallet yet")
    else:
        wallet = client.wallet
        parts.append(f"{wallet.currency} on {wallet.network} to {wallet.address}")
    return ", ".join(parts)


@clients_command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_clients(runtime: Runtime, as_json: bool) -> None:
    """List every client."""
    with runtime.database().transaction() as cur:
        rows = clients.list_all(cur)

    if as_json:
        click.echo(json.dumps([clients.as_json(row) for row in rows], indent=2))
    elif rows:
        click.echo(clients.as_table(rows))
    else:
        click.echo("no clients")


# ignore_unknown_options lets a negative amount reach the check that words
# the refusal, instead of click reading "-5" as an unknown option.
@clients_command.command(
    "set-threshold", context_settings={"ignore_unknown_options": True}
)
@click.option("--client-id", metavar="ID", callback=channel_id, required=True)
@click.option(
    "--threshold", "usd_option", metavar="USD", help="As `clients add` takes it."
)
@click.argument("usd", required=False)
@click.pass_obj
def set_threshold(
    runtime: Runtime, client_id: int, usd_option: str | None, usd: str | None
) -> None:
    """Change a threshold client's payout threshold (USD), given as
    ``USD`` or ``--threshold USD``."""
    if (usd is None) == (usd_option is None):
        raise click.UsageError("give the threshold once: USD or --threshold USD")
    usd = usd if usd is not None else usd_option
    assert usd is not None
    try:
        threshold = clients.parse_threshold(usd, "USD")
    except clients.InvalidInput as error:
        _bad_input(error)

    with runtime.database().transaction() as cur:
        changed = clients.set_threshold(cur, client_id, threshold)

    amount = money.to_text(threshold)
    if changed:
        click.echo(f"client {client_id}: threshold set to {amount} usd")
    else:
        click.echo(f"client {client_id}: threshold already {amount} usd, unchanged")


@clients_command.command("set-wallet")
@click.option("--client-id", metavar="ID", callback=channel_id, required=True)
@click.option("--wallet", metavar="ADDRESS", required=True)
@click.option("--currency", metavar="CODE", required=True)
@click.option("--network", metavar="CODE", required=True)
@click.pass_obj
def set_wallet(
    runtime: Runtime, client_id: int, wallet: str, currency: str, network: str
) -> None:
    """Change where a client is paid."""
    try:
        payout_wallet = clients.parse_wallet(wallet, currency, network)
    except clients.InvalidInput as error:
        _bad_input(error)

    with runtime.database().transaction() as cur:
        changed = clients.set_wallet(cur, client_id, payout_wallet)

    where = (
        f"{payout_wallet.currency} on {payout_wallet.network} "
        f"to {payout_wallet.address}"
    )
    if changed:
        click.echo(f"client {client_id}: paid in {where}")
    else:
        click.echo(f"client {client_id}: already paid in {where}, unchanged")


# --- status -----------------------------------------------------------------


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status_command(runtime: Runtime, as_json: bool) -> None:
    """Pending totals, each job's last run, open batches, undelivered tasks."""
    current = status.gather(runtime.database(), runtime.settings)

    if as_json:
        click.echo(json.dumps(status.as_json(current), indent=2))
    else:
        click.echo(status.as_text(current))


# --- releasing a stuck batch ------------------------------------------------


@main.group("batches")
def batches_command() -> None:
    """Operate on conversions and payout batches."""


def batch_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return release.parse_batch_id(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a batch id (a UUID)") from None


@batches_command.command("release")
@click.argument("batch_id_text", metavar="BATCH_ID", callback=batch_id)
@click.option("--reason", metavar="TEXT", help="Why; kept in failure_reason.")
@click.option("--yes", is_flag=True, help="Release without asking.")
@click.pass_obj
def release_batch(
    runtime: Runtime, batch_id_text: str, reason: str | None, yes: bool
) -> None:
    """Mark a stuck conversion or payout batch failed and return its rows.

    Do it only once its executor has said the swap or payout did not and
    will not happen.
    """
    db = runtime.database()
    shown = release.find(db, batch_id_text)
    for line in release.describe(shown, runtime.settings.swap_stale_after):
        click.echo(line)

    if not yes:
        click.confirm(f"Release {shown.kind.name} {shown.batch_id}?", abort=True)

    released = release.release(db, shown, reason)
    for line in release.outcome_lines(released):
        click.echo(line)


# --- running a job by hand --------------------------------------------------


@main.command("run")
@click.argument("job", type=click.Choice(sorted(trigger.ENDPOINTS)))
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the run's answer.",
)
@click.pass_obj
def run_job(runtime: Runtime, job: str, timeout_s: float) -> None:
    """Run a scheduled job now on its service (trigger manual)."""
    config = runtime.config()
    answer = trigger.run_job(config.settings, config.secrets, job, timeout_s)

    if answer.body is not None:
        click.echo(json.dumps(answer.body, indent=2, default=_json_default))
    if not answer.ok:
        raise click.ClickException(
            f"{answer.url} answered {answer.status}: {answer.error()}"
        )


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return money.to_text(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- replaying recorded deliveries ------------------------------------------


@main.group("deliveries")
def deliveries_command() -> None:
    """Recorded deliveries (ipn_events)."""


@deliveries_command.command("replay")
@click.option("--dry-run", is_flag=True, help="Show what would happen; write nothing.")
@click.pass_context
def replay_deliveries(ctx: click.Context, dry_run: bool) -> None:
    """Credit recorded deliveries whose client has been added since.

    Run it with the accumulator's PLATFORM_FEE_PERCENT and PRICE_SOURCE: the
    payments are credited as the accumulator would credit them now.
    """
    runtime: Runtime = ctx.obj
    db, settings = runtime.database(), runtime.settings
    accumulator = replay.accumulator_for(db, runtime.config())
    click.echo(
        f"crediting at a {money.to_text(settings.platform_fee_percent)} % "
        f"platform fee, {settings.prices.kind} prices"
    )

    replays = replay.replay_all(db, accumulator, dry_run)
    for item in replays:
        click.echo(item.line)
    click.echo(replay.summary(replays, dry_run))
    if replay.failed(replays):
        ctx.exit(1)


# --- Cloud Scheduler ----------------------------------------------------------


@main.group("scheduler")
def scheduler_command() -> None:
    """Compare the Cloud Scheduler jobs with scripts/scheduler_jobs.toml."""


def _declaration() -> scheduler_sync.Declaration:
    try:
        return scheduler_sync.load()
    except scheduler_sync.DeclarationError as error:
        raise ConfigurationProblem(str(error)) from None


@scheduler_command.command("check")
def scheduler_check() -> None:
    """Report every drift; exit 1 when there is any."""
    declaration = _declaration()
    drifts = scheduler_sync.check(scheduler_sync.make_client(), declaration)
    for drift in drifts:
        click.echo(drift.line)
    click.echo(f"scheduler: {len(drifts)} drift(s) over {len(declaration.jobs)} jobs")
    if drifts:
        raise SystemExit(1)


@scheduler_command.command("ensure")
def scheduler_ensure() -> None:
    """Create, update and resume jobs until they match; then check again."""
    declaration = _declaration()
    client = scheduler_sync.make_client()
    for action in scheduler_sync.ensure(client, declaration):
        click.echo(action)
    remaining = scheduler_sync.check(client, declaration)
    for drift in remaining:
        click.echo(drift.line)
    unfixed = [d for d in remaining if d.kind not in scheduler_sync.UNFIXABLE]
    click.echo(f"scheduler: {len(remaining)} drift(s) left, {len(unfixed)} unfixed")
    if unfixed:
        raise SystemExit(1)


# --- after a deploy -----------------------------------------------------------


@main.command("smoke")
@click.option(
    "--url",
    "urls",
    multiple=True,
    required=True,
    metavar="[NAME=]URL",
    help="A service's base URL, optionally with the name /health reports.",
)
@click.option("--expect-version", required=True, help="The version just deployed.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=10,
    show_default=True,
    metavar="SECONDS",
)
@click.pass_context
def smoke_command(
    ctx: click.Context, urls: tuple[str, ...], expect_version: str, timeout_s: float
) -> None:
    """Check each service's /health answers 200 at the expected version,
    called with a Google ID token for its URL; exit 1 naming each failure."""
    try:
        targets = [smoke.parse_target(text) for text in urls]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--url") from None
    tokens = (
        ctx.obj.token_source if ctx.obj.token_source else smoke.google_token_source()
    )

    results = smoke.run(targets, expect_version, tokens, timeout_s)
    for result in results:
        click.echo(result.line)
    click.echo(smoke.summary(results))
    if not all(result.passed for result in results):
        ctx.exit(1)
