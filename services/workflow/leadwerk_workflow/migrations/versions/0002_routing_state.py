"""Round-robin counters for owner assignment."""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE routing_state (workspace text NOT NULL, pool text NOT NULL, "
               "counter bigint NOT NULL DEFAULT 0, PRIMARY KEY (workspace, pool))")


def downgrade() -> None:
    op.execute("DROP TABLE routing_state")
