"""The conversation store on PostgreSQL (psycopg 3): its migrations (`migrations`), the
log writer's statements (`writer`), retention by partition (`retention`) and reads
(`reads`). SQLite stays the embedded default; a `postgresql://` URL selects this backend.
"""

from __future__ import annotations

