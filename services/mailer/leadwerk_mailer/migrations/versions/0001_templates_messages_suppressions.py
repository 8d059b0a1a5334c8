"""Templates (versioned), the message log with each command's delivery state, suppressions,
consents, outbox."""

from alembic import op

from leadwerk_platform.migrations import execute_script
from leadwerk_platform.outbox import OUTBOX_TABLE_SQL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE templates (
    workspace text NOT NULL,
    template_id text NOT NULL,
    version integer NOT NULL,
    document jsonb NOT NULL,
    actor text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, template_id, version)
);

-- One row per email command: its id is the idempotency key. ``sending`` is written and
-- committed before the SMTP transaction, ``sent`` after it.
CREATE TABLE messages (
    command_id uuid PRIMARY KEY,
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    template_id text NOT NULL,
    template_version integer,
    class text NOT NULL,
    to_address text,
    -- received | claimed | sending | sent | deferred | held | bounced | failed | suppressed
    -- | uncertain
    state text NOT NULL,
    reason text,
    smtp_code integer,
    status text,
    attempts integer NOT NULL DEFAULT 0,
    claim uuid,                     -- who is delivering it now (see delivery.py)
    next_attempt_at timestamptz,
    message_id text,
    command jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    sent_at timestamptz
);
CREATE INDEX messages_contact ON messages (workspace, contact_id, created_at);
CREATE INDEX messages_retry ON messages (next_attempt_at) WHERE state IN ('deferred', 'held');

CREATE TABLE suppressions (
    workspace text NOT NULL,
    address text NOT NULL,          -- lower-cased
    reason text NOT NULL,           -- unsubscribed | hard_bounce | complaint | erased | manual
    detail text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, address)
);

-- The consent log: every grant, confirmation and withdrawal, never updated in place.
CREATE TABLE consent_log (
    id bigserial PRIMARY KEY,
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    purpose text NOT NULL,
    action text NOT NULL,           -- granted | pending | confirmed | withdrawn
    source text NOT NULL,           -- form:<id> | api | email:<token> …
    text_version text,
    ip text,                        -- anonymised
    at timestamptz NOT NULL
);
CREATE INDEX consent_log_contact ON consent_log (workspace, contact_id, purpose, id);
-- Contact events already logged (each consent event counts once).
CREATE TABLE consent_events (
    event_id uuid PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now()
);
"""


def upgrade() -> None:
    execute_script(SCHEMA + OUTBOX_TABLE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE outbox, consent_events, consent_log, suppressions, messages, templates")
