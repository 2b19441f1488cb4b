"""The score table as its readers see it: one current row per (image_id, model), by ``schema.CURRENT_ROW_ORDER``.

A table is a directory of Parquet parts. A retried row is written to a new part and its error row stays in
an old one until compaction, so a reader never sees both or neither: it takes the current row."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from .errors import TRANSIENT_KINDS, error_kind
from .schema import CURRENT_ROW_KEY, CURRENT_ROW_ORDER, STATUS_OK
from .storage import list_parts, read_columns


def current_rows_sql(relation: str) -> str:
    """DuckDB SQL for the current rows of ``relation`` (a table, a view or a ``read_parquet(...)`` call)."""
    key = ", ".join(CURRENT_ROW_KEY)
    return f"SELECT * FROM {relation} QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {CURRENT_ROW_ORDER}) = 1"


def read_scores(uri: str, model: str | None = None) -> pa.Table:
    """The current rows of the score table at ``uri`` (any fsspec URI), of one model if given."""
    import duckdb

    from .curation import _register_filesystems, literal, scan

    parts = list_parts(uri)
    if not parts:
        return pa.table({})
    con = duckdb.connect()
    from .storage import scheme_of

    parts = [p if not scheme_of(uri) or scheme_of(uri) in ("file", "local") else f"{scheme_of(uri)}://{p}" for p in parts]
    _register_filesystems(con, parts)
    relation = f"(SELECT * FROM {scan(parts, 'parquet')}{f' WHERE model = {literal(model)}' if model else ''})"
    table = con.execute(current_rows_sql(relation) + " ORDER BY image_id, model").to_arrow_table()
    if "scored_at" in table.column_names:  # DuckDB names the zone Etc/UTC; the table's schema says UTC
        i = table.column_names.index("scored_at")
        table = table.set_column(i, "scored_at", table["scored_at"].cast(pa.timestamp("us", tz="UTC")))
    return table


def resume_state(output_uri: str, model_id: str, retry_errors: bool = False) -> tuple[pa.Array, int]:
    """(image ids ``output_uri`` holds a final row for, scored by ``model_id``; how many of its ids this run
    scores again). An id whose current row is an error of a transient kind (TRANSIENT_KINDS) is scored
    again, and with ``retry_errors`` so is every error row."""
    if not list_parts(output_uri):
        return pa.array([], pa.string()), 0
    rows = read_columns(output_uri, ["image_id", "status", "error", "scored_at"], filters=[("model", "=", model_id)])
    if len(rows) == 0:
        return pa.array([], pa.string()), 0
    ok_ids = pc.unique(rows.filter(pc.equal(rows["status"], STATUS_OK))["image_id"])
    errors = rows.filter(pc.invert(pc.is_in(rows["image_id"], value_set=ok_ids)))
    latest = (
        errors.sort_by([("image_id", "ascending"), ("scored_at", "ascending")])
        .group_by("image_id", use_threads=False).aggregate([("error", "last")])
    )
    kinds = [error_kind(e) or "" for e in latest["error_last"].to_pylist()]
    again = [retry_errors or k in TRANSIENT_KINDS for k in kinds]
    final_errors = latest["image_id"].filter(pa.array([not a for a in again], pa.bool_()))
    done = pa.concat_arrays([ok_ids.cast(pa.string()), final_errors.combine_chunks().cast(pa.string())])
    return done, sum(again)
