-- The whole schema of DESIGN.md section 3. Amount columns carry the CHECKs
-- of the money rules (section 2) and the invariants (section 8) that one row
-- can express, so a bug that would write a wrong amount fails loudly here.

-- When this suite's database was created: the clock for jobs that never ran.
CREATE TABLE suite_info (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO suite_info DEFAULT VALUES;

CREATE TABLE clients (
    client_id             bigint PRIMARY KEY,
    open_channel_id       bigint UNIQUE,
    payout_strategy       text NOT NULL
        CHECK (payout_strategy IN ('threshold', 'instant')),
    payout_threshold_usd  numeric(24, 10)
        CHECK (payout_threshold_usd > 0),
    wallet_address        text,
    payout_currency       text CHECK (payout_currency ~ '^[a-z0-9]{2,20}$'),
    payout_network        text CHECK (payout_network ~ '^[a-z0-9]{2,20}$'),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT clients_threshold_needs_amount
        CHECK (payout_strategy <> 'threshold' OR payout_threshold_usd IS NOT NULL),
    CONSTRAINT clients_open_channel_differs
        CHECK (open_channel_id IS DISTINCT FROM client_id),
    CONSTRAINT clients_wallet_whole
        CHECK ((wallet_address IS NULL) = (payout_currency IS NULL)
           AND (wallet_address IS NULL) = (payout_network IS NULL))
);

CREATE TABLE batch_conversions (
    batch_conversion_id   uuid PRIMARY KEY,
    outcome_currency      text NOT NULL,
    status                text NOT NULL DEFAULT 'claimed'
        CHECK (status IN ('claimed', 'swapping', 'completed', 'failed')),
    row_count             integer NOT NULL CHECK (row_count > 0),
    total_usd             numeric(24, 10) NOT NULL CHECK (total_usd >= 0),
    total_eth             numeric(38, 18) NOT NULL CHECK (total_eth > 0),
    threshold_usd         numeric(24, 10) NOT NULL CHECK (threshold_usd > 0),
    swap_id               text,
    tx_hash               text,
    actual_usdt_received  numeric(24, 6) CHECK (actual_usdt_received >= 0),
    failure_reason        text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    accepted_at           timestamptz,
    finished_at           timestamptz,
    CONSTRAINT batch_conversions_completed_has_amount
        CHECK (status <> 'completed' OR actual_usdt_received IS NOT NULL),
    CONSTRAINT batch_conversions_finished_has_time
        CHECK ((status IN ('completed', 'failed')) = (finished_at IS NOT NULL))
);

CREATE TABLE payout_batches (
    batch_id          uuid PRIMARY KEY,
    client_id         bigint NOT NULL REFERENCES clients,
    wallet_address    text NOT NULL,
    payout_currency   text NOT NULL,
    payout_network    text NOT NULL,
    total_usdt        numeric(24, 6) NOT NULL CHECK (total_usdt > 0),
    row_count         integer NOT NULL CHECK (row_count > 0),
    status            text NOT NULL DEFAULT 'claimed'
        CHECK (status IN ('claimed', 'sent', 'completed', 'failed')),
    tx_hash           text,
    amount_sent       numeric(38, 18) CHECK (amount_sent >= 0),
    sent_currency     text,
    failure_reason    text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    accepted_at       timestamptz,
    finished_at       timestamptz,
    CONSTRAINT payout_batches_finished_has_time
        CHECK ((status IN ('completed', 'failed')) = (finished_at IS NOT NULL))
);
CREATE INDEX payout_batches_client ON payout_batches (client_id);

CREATE TABLE payout_accumulation (
    id                      bigserial PRIMARY KEY,
    nowpayments_payment_id  text NOT NULL UNIQUE
        CHECK (nowpayments_payment_id <> ''),
    client_id               bigint NOT NULL REFERENCES clients,
    user_id                 bigint NOT NULL,
    subscription_id         text,
    payment_amount_usd      numeric(24, 10) NOT NULL
        CHECK (payment_amount_usd >= 0),
    usd_source              text NOT NULL
        CHECK (usd_source IN ('price', 'invoice', 'router')),
    platform_fee_percent    numeric(6, 4) NOT NULL
        CHECK (platform_fee_percent >= 0 AND platform_fee_percent < 50),
    accumulated_usd         numeric(24, 10) NOT NULL
        CHECK (accumulated_usd >= 0 AND accumulated_usd <= payment_amount_usd),
    accumulated_eth         numeric(38, 18) NOT NULL CHECK (accumulated_eth > 0),
    outcome_currency        text NOT NULL
        CHECK (outcome_currency ~ '^[a-z0-9]{2,20}$'),
    conversion_status       text NOT NULL DEFAULT 'pending'
        CHECK (conversion_status IN ('pending', 'swapping', 'converted')),
    batch_conversion_id     uuid REFERENCES batch_conversions,
    accumulated_usdt        numeric(24, 6) CHECK (accumulated_usdt >= 0),
    platform_fee_usdt       numeric(24, 6) CHECK (platform_fee_usdt >= 0),
    is_paid_out             boolean NOT NULL DEFAULT false,
    payout_batch_id         uuid REFERENCES payout_batches,
    paid_out_at             timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payout_accumulation_claim_matches_status
        CHECK ((conversion_status = 'pending') = (batch_conversion_id IS NULL)),
    CONSTRAINT payout_accumulation_usdt_when_converted
        CHECK ((conversion_status = 'converted') = (accumulated_usdt IS NOT NULL)
           AND (accumulated_usdt IS NULL) = (platform_fee_usdt IS NULL)),
    -- Invariant 5: nothing is paid, or even claimed for payout, unconverted.
    CONSTRAINT payout_accumulation_payout_needs_usdt
        CHECK (payout_batch_id IS NULL OR conversion_status = 'converted'),
    CONSTRAINT payout_accumulation_paid_needs_batch
        CHECK (NOT is_paid_out OR payout_batch_id IS NOT NULL),
    CONSTRAINT payout_accumulation_paid_has_time
        CHECK (is_paid_out = (paid_out_at IS NOT NULL))
);
CREATE INDEX payout_accumulation_pending
    ON payout_accumulation (outcome_currency) WHERE conversion_status = 'pending';
CREATE INDEX payout_accumulation_payable
    ON payout_accumulation (client_id)
    WHERE conversion_status = 'converted' AND payout_batch_id IS NULL;
CREATE INDEX payout_accumulation_conversion ON payout_accumulation (batch_conversion_id);
CREATE INDEX payout_accumulation_payout ON payout_accumulation (payout_batch_id);

-- Immutable membership: what each row contributed to a conversion or a
-- payout, kept after a failure has released the row to a later batch.
CREATE TABLE batch_conversion_members (
    batch_conversion_id  uuid NOT NULL REFERENCES batch_conversions,
    accumulation_id      bigint NOT NULL REFERENCES payout_accumulation,
    accumulated_eth      numeric(38, 18) NOT NULL CHECK (accumulated_eth > 0),
    accumulated_usd      numeric(24, 10) NOT NULL CHECK (accumulated_usd >= 0),
    PRIMARY KEY (batch_conversion_id, accumulation_id)
);
CREATE INDEX batch_conversion_members_row ON batch_conversion_members (accumulation_id);

CREATE TABLE payout_batch_members (
    batch_id          uuid NOT NULL REFERENCES payout_batches,
    accumulation_id   bigint NOT NULL REFERENCES payout_accumulation,
    accumulated_usdt  numeric(24, 6) NOT NULL CHECK (accumulated_usdt >= 0),
    PRIMARY KEY (batch_id, accumulation_id)
);
CREATE INDEX payout_batch_members_row ON payout_batch_members (accumulation_id);

-- Every delivery to /ipn or /payments, refused ones included.
CREATE TABLE ipn_events (
    id               bigserial PRIMARY KEY,
    received_at      timestamptz NOT NULL DEFAULT now(),
    source           text NOT NULL CHECK (source IN ('ipn', 'router')),
    request_id       text,
    payment_id       text,
    payment_status   text,
    -- NULL where no signature was checked (a router delivery, a non-JSON body).
    signature_valid  boolean,
    outcome          text NOT NULL CHECK (outcome IN (
        'accumulated', 'duplicate', 'not_final', 'unknown_client',
        'instant_client', 'bad_signature', 'unauthorized', 'invalid')),
    http_status      smallint NOT NULL,
    error_code       text,
    error_message    text,
    accumulation_id  bigint UNIQUE REFERENCES payout_accumulation,
    -- Truncated to the size limit; body_size says how long the body was.
    raw_body         bytea NOT NULL,
    body_size        integer NOT NULL CHECK (body_size >= 0),
    replayed_at      timestamptz,
    CONSTRAINT ipn_events_credit_linked
        CHECK ((outcome = 'accumulated') = (accumulation_id IS NOT NULL))
);
CREATE INDEX ipn_events_payment ON ipn_events (payment_id);
CREATE INDEX ipn_events_unknown_client
    ON ipn_events (received_at) WHERE outcome = 'unknown_client';

-- Tasks to send, written in the transaction of the change that needs them.
CREATE TABLE outbox (
    id               bigserial PRIMARY KEY,
    service          text NOT NULL,
    target_url       text NOT NULL,
    payload          jsonb NOT NULL,
    headers          jsonb NOT NULL DEFAULT '{}',
    dedup_key        text NOT NULL UNIQUE,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_unsent ON outbox (service, next_attempt_at) WHERE sent_at IS NULL;

-- One row per scheduled run; the newest successful finished_at is the
-- job's heartbeat.
CREATE TABLE job_runs (
    id           bigserial PRIMARY KEY,
    job          text NOT NULL CHECK (job IN ('check-threshold', 'process')),
    slot         timestamptz NOT NULL,
    trigger      text NOT NULL CHECK (trigger IN ('scheduler', 'watchdog', 'manual')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    outcome      text NOT NULL DEFAULT 'running'
        CHECK (outcome IN ('running', 'succeeded', 'failed', 'busy', 'repeated')),
    figures      jsonb NOT NULL DEFAULT '{}',
    error        text,
    CONSTRAINT job_runs_finished_unless_running
        CHECK ((outcome = 'running') = (finished_at IS NULL))
);
-- A slot succeeds once: a repeated delivery of it does not run again.
CREATE UNIQUE INDEX job_runs_one_success_per_slot
    ON job_runs (job, slot) WHERE outcome = 'succeeded';
CREATE INDEX job_runs_heartbeat
    ON job_runs (job, finished_at DESC) WHERE outcome = 'succeeded';
