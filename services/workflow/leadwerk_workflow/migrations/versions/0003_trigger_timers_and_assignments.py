"""Timers of date and silence triggers, the contact's last own activity, assignments."""

from alembic import op

from leadwerk_platform.migrations import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = """
-- When a date or silence trigger (inactive_for) enters a contact into a journey.
CREATE TABLE trigger_timers (
    workspace text NOT NULL,
    journey_id text NOT NULL,
    contact_id uuid NOT NULL,
    due_at timestamptz NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (workspace, journey_id, contact_id)
);
CREATE INDEX trigger_timers_due ON trigger_timers (due_at);
CREATE INDEX trigger_timers_contact ON trigger_timers (workspace, contact_id);

-- The contact's last activity of its own (to arm silence triggers of journeys activated later).
ALTER TABLE contact_state ADD COLUMN last_active_at timestamptz;

-- Every owner assignment, for fair distribution (count and rating per rep over a period).
CREATE TABLE assignments (
    id bigserial PRIMARY KEY,
    workspace text NOT NULL,
    pool text NOT NULL,
    owner text NOT NULL,
    contact_id uuid NOT NULL,
    rating text,
    value double precision NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX assignments_pool ON assignments (workspace, pool, at);
CREATE INDEX assignments_contact ON assignments (workspace, contact_id);
"""


def upgrade() -> None:
    execute_script(SCHEMA)


def downgrade() -> None:
    op.execute("DROP TABLE assignments, trigger_timers")
    op.execute("ALTER TABLE contact_state DROP COLUMN last_active_at")
