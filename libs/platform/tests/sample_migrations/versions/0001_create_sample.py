"""Create a sample table (test fixture for the migration runner)."""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE sample (workspace text NOT NULL, id bigint NOT NULL, "
               "PRIMARY KEY (workspace, id))")


def downgrade() -> None:
    op.execute("DROP TABLE sample")
