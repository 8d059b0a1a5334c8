"""Deliveries (the outbound log, with retry state and dead letters), inbound dedup, outbox."""

from alembic import op

from leadwerk_platform.migrations import execute_script
from leadwerk_platform.outbox import OUTBOX_TABLE_SQL, PROCESSED_TABLE_SQL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = """
-- One row per (command, connector): its id is the webhook-id receivers deduplicate on.
CREATE TABLE deliveries (
    delivery_id uuid PRIMARY KEY,
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    command_id uuid NOT NULL,
    connector text NOT NULL,
    url text NOT NULL,
    event text NOT NULL,
    body bytea NOT NULL,
    state text NOT NULL,            -- pending | delivered | dead
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_status integer,
    last_error text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    delivered_at timestamptz
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_contact ON deliveries (workspace, contact_id, connector, created_at);
CREATE INDEX deliveries_dead ON deliveries (workspace, updated_at) WHERE state = 'dead';

-- Inbound CRM events already taken (replays and duplicates are harmless).
CREATE TABLE inbound_events (
    workspace text NOT NULL,
    source text NOT NULL,
    event_id text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, source, event_id)
);
"""


def upgrade() -> None:
    execute_script(PROCESSED_TABLE_SQL + SCHEMA + OUTBOX_TABLE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE outbox, processed, inbound_events, deliveries")
