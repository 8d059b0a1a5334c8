"""Journeys (versioned), enrollments with their timers, history, contact projection, outbox."""

from alembic import op

from leadwerk_platform.migrations import execute_script
from leadwerk_platform.outbox import OUTBOX_TABLE_SQL, PROCESSED_TABLE_SQL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE journeys (
    workspace text NOT NULL,
    journey_id text NOT NULL,
    version integer NOT NULL,
    document jsonb NOT NULL,
    actor text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, journey_id, version)
);

CREATE TABLE journey_status (
    workspace text NOT NULL,
    journey_id text NOT NULL,
    status text NOT NULL,                   -- draft | active | paused
    active_version integer,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, journey_id)
);

CREATE TABLE enrollments (
    enrollment_id uuid PRIMARY KEY,
    workspace text NOT NULL,
    journey_id text NOT NULL,
    version integer NOT NULL,
    contact_id uuid NOT NULL,
    state text NOT NULL,                    -- active | completed | exited
    step text,
    due_at timestamptz,                     -- the durable timer of the resting step
    waiting_for text,                       -- activity kind a wait_for step waits for
    visits jsonb NOT NULL DEFAULT '{}',
    branches jsonb NOT NULL DEFAULT '{}',
    entered_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    ended_at timestamptz,
    end_reason text
);
CREATE INDEX enrollments_due ON enrollments (due_at) WHERE state = 'active' AND due_at IS NOT NULL;
CREATE INDEX enrollments_contact ON enrollments (workspace, contact_id, state);
CREATE UNIQUE INDEX enrollments_one_active ON enrollments (workspace, journey_id, contact_id)
    WHERE state = 'active';

CREATE TABLE journey_history (
    id bigserial PRIMARY KEY,
    enrollment_id uuid NOT NULL,
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    journey_id text NOT NULL,
    version integer NOT NULL,
    step_id text,
    action text NOT NULL,
    reason text NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX journey_history_contact ON journey_history (workspace, contact_id, id);
CREATE INDEX journey_history_enrollment ON journey_history (enrollment_id, id);

-- What the workflow knows of each contact, from contact events and changes.
CREATE TABLE contact_state (
    workspace text NOT NULL,
    contact_id uuid NOT NULL,
    traits jsonb NOT NULL DEFAULT '{}',
    score double precision,
    grade text,
    rating text,
    stage text,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (workspace, contact_id)
);
"""


def upgrade() -> None:
    execute_script(PROCESSED_TABLE_SQL + SCHEMA + OUTBOX_TABLE_SQL)


def downgrade() -> None:
    op.execute("DROP TABLE outbox, processed, contact_state, journey_history, enrollments, "
               "journey_status, journeys")
