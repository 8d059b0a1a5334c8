"""Identity graph, timeline, profiles, scores, lifecycle, models, outbox."""

from alembic import op

from leadwerk_platform.migrations import execute_script
from leadwerk_platform.outbox import OUTBOX_TABLE_SQL, PROCESSED_TABLE_SQL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = """
-- Known contacts only. An anonymous device is a contact without a row: its id is derived from
-- the device id, and it exists as timeline rows (and a score row) until it becomes known.
CREATE TABLE contacts (
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    last_seen_at timestamptz,
    traits jsonb NOT NULL DEFAULT '{}',      -- name -> {"value": ..., "at": timestamp}
    first_touch jsonb,
    last_touch jsonb,
    PRIMARY KEY (workspace, contact_id)
);

CREATE TABLE identities (
    workspace text NOT NULL,
    kind text NOT NULL,                      -- anonymous | user | email | declared kinds
    value text NOT NULL,
    contact_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (workspace, kind, value)
);
CREATE INDEX identities_contact ON identities (workspace, contact_id);

CREATE TABLE merges (
    workspace text NOT NULL,
    merged_id uuid NOT NULL,
    survivor_id uuid NOT NULL,
    reason text NOT NULL,
    actor text NOT NULL,
    event_id uuid,
    merged_at timestamptz NOT NULL,
    PRIMARY KEY (workspace, merged_id)
);
CREATE INDEX merges_survivor ON merges (workspace, survivor_id);

CREATE TABLE timeline (
    workspace text NOT NULL,
    event_id uuid NOT NULL,
    contact_id uuid NOT NULL,
    type text NOT NULL,
    name text,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    session_id uuid,
    known boolean NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (workspace, event_id)
);
CREATE INDEX timeline_contact ON timeline (workspace, contact_id, occurred_at DESC);
CREATE INDEX timeline_anonymous_age ON timeline (received_at) WHERE NOT known;

-- Identifiers of erased contacts (SHA-256, never the value): in-flight events cannot
-- re-create the profile.
CREATE TABLE blocked_identities (
    workspace text NOT NULL,
    digest text NOT NULL,
    blocked_at timestamptz NOT NULL,
    PRIMARY KEY (workspace, digest)
);

-- The processed records (PROCESSED_TABLE_SQL) by age, for the retention sweep.
CREATE INDEX processed_age ON processed (processed_at);

CREATE TABLE scores (
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    engagement double precision NOT NULL DEFAULT 0,
    engagement_at timestamptz,
    grade text NOT NULL DEFAULT 'C',
    known boolean NOT NULL DEFAULT false,
    stage text NOT NULL DEFAULT 'visitor',
    stage_changed_at timestamptz,
    downgrade_at timestamptz,               -- when decay takes an MQL below the lower threshold
    model_version integer NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (workspace, contact_id)
);
CREATE INDEX scores_downgrade ON scores (downgrade_at) WHERE downgrade_at IS NOT NULL;

CREATE TABLE score_history (
    id bigserial PRIMARY KEY,
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    event_id uuid NOT NULL,
    event_type text NOT NULL,
    rule text NOT NULL,
    points double precision NOT NULL,
    occurred_at timestamptz NOT NULL,
    model_version integer NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX score_history_contact ON score_history (workspace, contact_id, occurred_at);

CREATE TABLE rule_counts (
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    rule text NOT NULL,
    window_start timestamptz NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (workspace, contact_id, rule, window_start)
);

CREATE TABLE stage_history (
    id bigserial PRIMARY KEY,
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    from_stage text NOT NULL,
    to_stage text NOT NULL,
    cause text NOT NULL,
    reason text,
    event_id uuid,
    changed_at timestamptz NOT NULL
);
CREATE INDEX stage_history_contact ON stage_history (workspace, contact_id, id);

CREATE TABLE scoring_models (
    workspace text NOT NULL,
    version integer NOT NULL,
    document jsonb NOT NULL,
    actor text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, version)
);
"""


def upgrade() -> None:
    execute_script(PROCESSED_TABLE_SQL + SCHEMA + OUTBOX_TABLE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE outbox, scoring_models, stage_history, rule_counts, score_history, "
               "scores, processed, blocked_identities, timeline, merges, identities, contacts")
