"""The Parquet schemas of the project, defined once. The score table is the contract between the scoring
job and the curation jobs."""
from __future__ import annotations

import pyarrow as pa

SCORE_BASE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("score", pa.float32()),
]
SCORE_TAIL_FIELDS = [
    pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
    pa.field("error", pa.string()),  # "<kind>: <message>", null when ok
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("model", pa.string(), nullable=False),  # "<config name>@<weights hash>"
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
]
STATUS_OK = "ok"
STATUS_ERROR = "error"


def gate_column(expert: str) -> str:
    return f"gate_{expert}"


def feature_column(prompt_name: str) -> str:
    return f"feature_{prompt_name}"


def score_schema(
    experts: list[str],
    keep_columns: dict[str, pa.DataType] | None = None,
    features: dict[str, int] | None = None,
) -> pa.Schema:
    """The score table for a model with these experts; ``keep_columns`` are passed-through manifest columns,
    ``features`` maps prompt name -> width of the semantic vectors kept as float16."""
    fields = list(SCORE_BASE_FIELDS)
    fields += [pa.field(gate_column(e), pa.float32()) for e in experts]
    fields += SCORE_TAIL_FIELDS
    for name, typ in (keep_columns or {}).items():
        if name in {f.name for f in fields}:
            raise ValueError(f"kept column {name!r} clashes with a score table column")
        fields.append(pa.field(name, typ))
    for name, dim in (features or {}).items():
        fields.append(pa.field(feature_column(name), pa.list_(pa.float16(), dim)))
    return pa.schema(fields)


def validate_score_table(table: pa.Table, experts: list[str]) -> None:
    """Raise ValueError if ``table`` breaks the contract: required columns and types, status values,
    error set exactly on error rows, a score exactly on ok rows."""
    required = score_schema(experts)
    for f in required:
        if f.name not in table.schema.names:
            raise ValueError(f"score table lacks column {f.name!r}")
        if not table.schema.field(f.name).type.equals(f.type):
            raise ValueError(f"column {f.name!r} is {table.schema.field(f.name).type}, expected {f.type}")
    import pyarrow.compute as pc

    status = table["status"]
    if not pc.all(pc.is_in(status, pa.array([STATUS_OK, STATUS_ERROR]))).as_py():
        raise ValueError("status must be 'ok' or 'error'")
    ok = pc.equal(status, STATUS_OK)
    if not pc.all(pc.equal(ok, pc.is_valid(table["score"]))).as_py():
        raise ValueError("score must be set exactly on ok rows")
    if not pc.all(pc.equal(ok, pc.is_null(table["error"]))).as_py():
        raise ValueError("error must be set exactly on error rows")
    if table["image_id"].null_count:
        raise ValueError("image_id must never be null")


# The table's one rule for its current rows. A run writes an image_id again only to retry its error row, so a
# table can hold superseded rows (and, for a moment during compaction, copies): per (image_id, model) the
# current row is the ok one, else the latest. Every reader (the job's resume, jobs.filter, jobs.report,
# ma_agiqa.read_scores) orders by this and takes the first row. ``error`` last: two error rows of one
# instant and uri are still ordered, so resume (which retries by the current row's error kind) and the readers
# pick the same one.
CURRENT_ROW_ORDER = f"(status = '{STATUS_OK}') DESC, scored_at DESC, uri, error"
CURRENT_ROW_KEY = ("image_id", "model")
