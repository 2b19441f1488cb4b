"""The score table as its readers see it: one current row per (image_id, model), by ``schema.CURRENT_ROW_ORDER``.

A table is a directory of Parquet parts. A retried row is written to a new part and its error row stays in
an old one until compaction, so a reader never sees both or neither: it takes the current row. Queries run
on DuckDB, which streams the parts (local or through fsspec) instead of loading the table into memory."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import TRANSIENT_KINDS
from .schema import CURRENT_ROW_KEY, CURRENT_ROW_ORDER, STATUS_OK
from .table_files import duckdb_connection, part_uris


def current_rows_sql(relation: str, columns: str = "*", tiebreak: str = "") -> str:
    """DuckDB SQL for the current rows of ``relation`` (a table, a view or a ``read_parquet(...)`` call);
    ``tiebreak`` orders exact copies (``_file, _row`` where the relation has them)."""
    key = ", ".join(CURRENT_ROW_KEY)
    order = CURRENT_ROW_ORDER + (f", {tiebreak}" if tiebreak else "")
    return f"SELECT {columns} FROM {relation} QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order}) = 1"


def scan_parts(parts: list[str]) -> str:
    from .curation import scan

    return scan(parts)


def read_scores(uri: str, model: str | None = None) -> pa.Table:
    """The current rows of the score table at ``uri`` (any fsspec URI), of one model if given."""
    from .curation import literal

    parts = part_uris(uri)
    if not parts:
        return pa.table({})
    con = duckdb_connection(parts)
    relation = f"(SELECT * FROM {scan_parts(parts)}{f' WHERE model = {literal(model)}' if model else ''})"
    table = con.sql(current_rows_sql(relation) + " ORDER BY image_id, model").to_arrow_table()  # no DB-API copy
    if "scored_at" in table.column_names:  # DuckDB names the zone Etc/UTC; the table's schema says UTC
        i = table.column_names.index("scored_at")
        table = table.set_column(i, "scored_at", table["scored_at"].cast(pa.timestamp("us", tz="UTC")))
    return table


def extremes(uri: str, model: str, n: int = 3) -> dict[str, list[dict]]:
    """The ``n`` best and worst scored images of ``model`` in the table (current ok rows): what a user looks
    at first. DuckDB keeps only the top rows of each end while it streams the parts."""
    from .curation import literal

    parts = part_uris(uri)
    if not parts:
        return {"best": [], "worst": []}
    con = duckdb_connection(parts)
    current = current_rows_sql(f"(SELECT image_id, uri, model, status, scored_at, error, score FROM {scan_parts(parts)} "
                               f"WHERE model = {literal(model)})")
    out = {}
    for name, order in (("best", "DESC"), ("worst", "ASC")):
        rows = con.execute(f"SELECT image_id, uri, score FROM ({current}) WHERE status = '{STATUS_OK}' "
                           f"ORDER BY score {order}, image_id LIMIT {int(n)}").fetchall()
        out[name] = [{"image_id": i, "uri": u, "score": round(float(s), 3)} for i, u, s in rows]
    return out


def resume_plan(output_uri: str, model_id: str, ids: pa.ChunkedArray | pa.Array, wanted: np.ndarray | None = None,
                retry_errors: bool = False) -> tuple[np.ndarray, int]:
    """Which manifest rows the table already holds a final row for: (a bool mask over ``ids``, how many of the
    ``wanted`` rows have an error row that this run scores again).

    An id's current row (the one ``read_scores`` returns: ``current_rows_sql``) is final when it is ok, or an
    error of a permanent kind (any kind with ``retry_errors`` is scored again; transient ones,
    TRANSIENT_KINDS, always are). An anti-join on DuckDB: the table's parts are
    streamed, narrowed to this model and to the manifest's ids, and never held by the caller."""
    from .curation import literal

    done = np.zeros(len(ids), bool)
    parts = part_uris(output_uri)
    if not parts or len(ids) == 0:
        return done, 0
    manifest = pa.table({"image_id": ids, "pos": pa.array(np.arange(len(ids), dtype=np.int64))})
    if wanted is not None:
        manifest = manifest.filter(pa.array(wanted))
    con = duckdb_connection(parts)
    con.register("manifest", manifest)
    transient = ", ".join(literal(k) for k in sorted(TRANSIENT_KINDS))
    again = "TRUE" if retry_errors else f"split_part(error, ':', 1) IN ({transient})"
    rows = (f"(SELECT image_id, model, uri, status, error, scored_at FROM {scan_parts(parts)} "
            f"WHERE model = {literal(model_id)} AND image_id IN (SELECT image_id FROM manifest))")
    result = con.sql(f"""
        WITH current AS ({current_rows_sql(rows)})
        SELECT m.pos, (c.status = '{STATUS_OK}' OR NOT ({again})) AS final
        FROM manifest m JOIN current c USING (image_id)""").to_arrow_table()
    pos = result["pos"].to_numpy()
    final = result["final"].to_numpy(zero_copy_only=False).astype(bool)
    done[pos[final]] = True
    return done, int((~final).sum())
