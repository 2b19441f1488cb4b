"""Curation: decide which scored images to keep, joined with their prompt metadata.

Rules are small classes (as datatrove's filters are): each sees only the rows the rules before it kept, and
rejects some of them with its name and a reason, so every rejected row says why. They compile to SQL run by
DuckDB, an in-process engine that streams Parquet and spills to disk when a table outgrows the memory
limit: a table larger than memory works on one machine, and a small one takes well under a second, with no
cluster to start. Object stores are read through the same fsspec filesystems as the scoring job. The
metadata table is read file by file with the scoring job's own manifest reader into a DuckDB table (one
reader and one image_id rule, ``manifests.image_ids``, for both: a manifest joins by the ids its rows were
scored under, whatever types its writer chose), so one metadata file must fit in memory, as a manifest must.

Join rules, all reported in the summary and none silent:
- a score table holding several models' scores must be narrowed to one (``model``): scores of different
  models do not compare;
- an image_id scored twice: the ok row, else the latest, is used; the others are rejected as ``duplicate_score``;
- a metadata key seen twice: its first row (in file order) is joined; the others are rejected as
  ``duplicate_metadata``;
- a score row with no metadata row: rejected as ``no_metadata`` (or left out of scope, counted, when
  ``unmatched_scores="ignore"``, as jobs.curate does for images of other manifests);
- a metadata row with no score row: rejected as ``no_score``;
- a metadata column whose name the score table already uses is renamed ``meta_<name>``;
- a column a rule needs that neither table has: CurationError before anything runs.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from .schema import CURRENT_ROW_ORDER, STATUS_OK, gate_column
from .manifests import ID_COLUMNS, ManifestError, expand_manifest, image_ids, read_manifest_file
from .errors import OutputError
from .table_files import (
    check_output_location, duckdb_connection, duckdb_path, register_filesystems, remove_tree, write_json,
    write_part_atomically,
)
from .uris import join_uri

KEPT_DIR, REJECTED_DIR, GROUPS_FILE, SUMMARY_FILE = "kept", "rejected", "groups.parquet", "_summary.json"
META_PREFIX = "meta_"
MAX_GROUPS_IN_SUMMARY = 1000


class CurationError(ValueError):
    """Options that do not fit the tables: nothing is read beyond their schemas, nothing is written."""


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(float(value)) if isinstance(value, float) else str(value)


# -- rules ---------------------------------------------------------------------------------------------------
# Each rule turns the relation ``prev`` into one with the same columns, setting _rejected_by and _reason on the
# rows it rejects among those still kept (_rejected_by IS NULL).
def _reject(prev: str, condition: str, rule: str, reason: str, extra_exclude: str = "", source: str | None = None) -> str:
    return (
        f"SELECT * {extra_exclude} REPLACE ("
        f"CASE WHEN _rejected_by IS NULL AND ({condition}) THEN {literal(rule)} ELSE _rejected_by END AS _rejected_by, "
        f"CASE WHEN _rejected_by IS NULL AND ({condition}) THEN {reason} ELSE _reason END AS _reason) "
        f"FROM {source or prev}"
    )


@dataclass
class DropErrors:
    """Rejects the rows the scoring job could not score."""

    name: str = "error"

    def columns(self) -> list[str]:
        return ["status"]

    def sql(self, prev: str) -> str:
        return _reject(prev, f"status IS DISTINCT FROM {literal(STATUS_OK)}", self.name, "coalesce(error, 'not scored')")

    def describe(self) -> dict:
        return {"rule": self.name}


@dataclass
class Threshold:
    """Rejects rows whose ``column`` is not ``op`` ``value``; a row without a value (an error row) fails."""

    name: str
    column: str
    op: str  # ">=" | "<="
    value: float

    def columns(self) -> list[str]:
        return [self.column]

    def sql(self, prev: str) -> str:
        c = quote(self.column)
        fails = {">=": "<", "<=": ">"}[self.op]
        reason = (
            f"CASE WHEN {c} IS NULL THEN 'no {self.column} (error row)' "
            f"ELSE printf('{self.column} %.4f {fails} {self.value:g}', {c}) END"
        )
        return _reject(prev, f"NOT coalesce({c} {self.op} {literal(float(self.value))}, false)", self.name, reason)

    def describe(self) -> dict:
        return {"rule": self.name, "column": self.column, "op": self.op, "value": self.value}


@dataclass
class TopRank:
    """Keeps the best rows by score, globally or per group: ``k`` of them, or ``fraction`` of each group
    (ceil(fraction x group size): a group is never emptied). Ties at the cut are broken by image_id, so
    exactly that many are kept and a re-run keeps the same ones; ``keep_ties`` keeps every row tied with
    the last one kept instead. Rows without a score are rejected; group sizes count the scored rows still
    kept by the earlier rules."""

    name: str  # "top_k" | "top_fraction"
    k: int | None = None
    fraction: float | None = None
    per: str | None = None
    keep_ties: bool = False

    def columns(self) -> list[str]:
        return ["score"] + ([self.per] if self.per else [])

    def sql(self, prev: str) -> str:
        eligible = "(_rejected_by IS NULL AND score IS NOT NULL)"
        partition = f"PARTITION BY {quote(self.per) + ', ' if self.per else ''}{eligible}"
        rank = "rank() OVER (w ORDER BY score DESC)" if self.keep_ties else "row_number() OVER (w ORDER BY score DESC, image_id)"
        limit = str(int(self.k)) if self.k is not None else f"CAST(ceil({float(self.fraction)!r} * _n - 1e-9) AS BIGINT)"
        ranked = f"(SELECT *, {rank} AS _rank, count(*) OVER w AS _n FROM {prev} WINDOW w AS ({partition}))"
        group = f"' in {self.per} = ' || coalesce(CAST({quote(self.per)} AS VARCHAR), 'NULL')" if self.per else "''"
        reason = (
            f"CASE WHEN score IS NULL THEN 'no score (error row)' "
            f"ELSE printf('rank %d of %d', _rank, _n) || {group} || printf(', keeping %d', {limit}) END"
        )
        return _reject(prev, f"score IS NULL OR _rank > {limit}", self.name, reason, "EXCLUDE (_rank, _n)", ranked)

    def describe(self) -> dict:
        d = {"rule": self.name, "per": self.per, "keep_ties": self.keep_ties}
        d.update({"k": self.k} if self.k is not None else {"fraction": self.fraction})
        return d


def build_rules(
    drop_errors: bool = False,
    min_score: float | None = None,
    max_gate_quality: float | None = None,
    top_fraction: float | None = None,
    top_k: int | None = None,
    per: str | None = None,
    keep_ties: bool = False,
) -> list:
    """The rules in the one order they apply: errors, thresholds, then per-group ranks (a fraction, then a
    count: "the best 30 % of each prompt, at most 4")."""
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise CurationError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    if top_k is not None and top_k < 1:
        raise CurationError(f"--top-k must be at least 1, got {top_k}")
    if per and top_fraction is None and top_k is None:
        raise CurationError("--per groups --top-fraction or --top-k: give one of them")
    rules: list = []
    if drop_errors:
        rules.append(DropErrors())
    if min_score is not None:
        rules.append(Threshold("min_score", "score", ">=", min_score))
    if max_gate_quality is not None:
        rules.append(Threshold("max_gate_quality", gate_column("quality"), "<=", max_gate_quality))
    if top_fraction is not None:
        rules.append(TopRank("top_fraction", fraction=top_fraction, per=per, keep_ties=keep_ties))
    if top_k is not None:
        rules.append(TopRank("top_k", k=top_k, per=per, keep_ties=keep_ties))
    return rules


# -- reading -------------------------------------------------------------------------------------------------
def scan(files: list[str], row_order: bool = False) -> str:
    """SQL that reads a list of Parquet files (a score table's parts), each by its own name (glob characters
    in it escaped); ``row_order`` adds _file, _row: file order. Metadata in other formats: load_metadata."""
    listed = "[" + ", ".join(literal(duckdb_path(f)) for f in files) + "]"
    extra = ", filename = '_file', file_row_number = true" if row_order else ""
    sql = f"read_parquet({listed}, union_by_name = true{extra})"
    return f"(SELECT * RENAME (file_row_number AS _row) FROM {sql})" if row_order else sql


METADATA_TABLE = "_metadata"
DERIVED_ID = "_image_id"  # in METADATA_TABLE: each row's image_id by manifests.image_ids
INTERNAL_METADATA_COLUMNS = ("_file", "_row", DERIVED_ID)


def load_metadata(con, files: list[str], fmt: str, key: str, derive: bool | None) -> list[str]:
    """Reads a metadata table (Parquet, CSV or JSONL) file by file with the scoring job's manifest reader
    into the DuckDB table ``_metadata`` (which spills to disk past the memory limit), so ids and ``key`` are
    the text the files hold and each row's derived image_id (``_image_id``) is the one the scoring job gave
    it: one reader and one id rule for both, never DuckDB's own type inference. Files' columns are unified
    as the scoring job unifies them (Arrow's permissive promotion: int and float make float). ``derive``:
    compute the ids (True), or only for files without ``key`` (None). Returns the columns as read."""
    text = tuple(dict.fromkeys((*ID_COLUMNS, key)))
    schema = None  # the files' unified Arrow schema so far
    for f in files:
        table = read_manifest_file(f, fmt, text)
        if derive or (derive is None and key not in table.column_names):
            table = table.append_column(DERIVED_ID, image_ids(table))
        table = table.append_column("_file", pa.array([f] * len(table), pa.string()))
        table = table.append_column("_row", pa.array(range(len(table)), pa.int64()))
        try:
            unified = table.schema if schema is None else pa.unify_schemas([schema, table.schema], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
            raise CurationError(f"metadata file {f}: its columns' types differ from the files before it: {str(e)[:300]}") from None
        stored = pa.schema([pa.field(x.name, pa.string()) if pa.types.is_null(x.type) else x for x in unified])
        table = table.cast(pa.schema([stored.field(n) for n in table.column_names]))
        if schema is None:
            con.register("_metadata_file", table)
            con.execute(f"CREATE TEMP TABLE {METADATA_TABLE} AS SELECT * FROM _metadata_file")
        else:
            old = pa.schema([pa.field(x.name, pa.string()) if pa.types.is_null(x.type) else x for x in schema])
            new_types = _duckdb_types(con, stored)
            for field_ in stored:
                if field_.name not in old.names:  # a column this file adds: null in the files before it
                    con.execute(f"ALTER TABLE {METADATA_TABLE} ADD COLUMN {quote(field_.name)} {new_types[field_.name]}")
                elif not old.field(field_.name).type.equals(field_.type):  # promoted (null -> int, int -> float)
                    con.execute(f"ALTER TABLE {METADATA_TABLE} ALTER COLUMN {quote(field_.name)} TYPE {new_types[field_.name]}")
            con.register("_metadata_file", table)
            con.execute(f"INSERT INTO {METADATA_TABLE} BY NAME SELECT * FROM _metadata_file")
        con.unregister("_metadata_file")
        schema = unified
    return [n for n in schema.names if n not in INTERNAL_METADATA_COLUMNS]


def _duckdb_types(con, schema: pa.Schema) -> dict[str, str]:
    """DuckDB's name for each Arrow column type of ``schema``."""
    con.register("_metadata_schema", schema.empty_table())
    try:
        return {name: typ for name, typ, *_ in con.execute("DESCRIBE _metadata_schema").fetchall()}
    finally:
        con.unregister("_metadata_schema")


@dataclass
class Plan:
    """What a filter run reads and does; built and checked before any row is read."""

    scores: str
    rules: list
    model: str | None = None
    metadata: str | None = None
    on: tuple[str, str] = ("image_id", "image_id")  # (score column, metadata column)
    unmatched_scores: str = "reject"  # "reject" | "ignore"
    score_columns: list[str] = field(default_factory=list)
    metadata_columns: list[str] = field(default_factory=list)  # as read
    renamed: dict[str, str] = field(default_factory=dict)  # metadata column -> its name in the output
    derive_key: bool = False  # the metadata is a manifest: derive image_id from id / uri as the scoring job does
    score_files: list[str] = field(default_factory=list)
    metadata_files: list[str] = field(default_factory=list)
    metadata_format: str = "parquet"


def parse_on(on: str | None) -> tuple[str, str]:
    """``image_id`` or ``image_id=id``: the score table's key column, and the metadata's."""
    if not on:
        return ("image_id", "image_id")
    left, _, right = on.partition("=")
    return (left.strip(), (right or left).strip())


def plan(con, scores: str, rules: list, model: str | None = None, metadata: str | None = None, on: str | None = None,
         unmatched_scores: str = "reject", metadata_is_manifest: bool = False) -> Plan:
    """Checks the options against the tables' schemas. ``metadata_is_manifest``: the metadata is the manifest
    the scores came from, its ids derived as the scoring job derives them (also the default when it has a
    ``uri`` column and no join column)."""
    p = Plan(scores=scores, rules=rules, model=model, metadata=metadata, on=parse_on(on), unmatched_scores=unmatched_scores)
    try:
        p.score_files, fmt = expand_manifest(scores)
    except ManifestError as e:  # the reader's words are a manifest's: say score table
        raise CurationError(str(e).replace("manifest ", "score table ", 1)) from None
    if fmt != "parquet":
        raise CurationError(f"score table {scores} must be Parquet (it holds {fmt} files)")
    register_filesystems(con, p.score_files)
    p.score_columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {scan(p.score_files)}").fetchall()]
    if p.on[0] not in p.score_columns:
        raise CurationError(f"the score table has no column {p.on[0]!r} to join on (columns: {', '.join(p.score_columns)})")
    available = set(p.score_columns)
    if metadata:
        p.metadata_files, p.metadata_format = expand_manifest(metadata)
        derive = True if metadata_is_manifest else (None if p.on[0] == "image_id" else False)
        p.metadata_columns = load_metadata(con, p.metadata_files, p.metadata_format, p.on[1], derive)
        if metadata_is_manifest or p.on[1] not in p.metadata_columns:
            if p.on[0] == "image_id" and "uri" in p.metadata_columns:
                p.derive_key = True
            else:
                raise CurationError(
                    f"the metadata has no column {p.on[1]!r} to join on (columns: {', '.join(p.metadata_columns)})")
        for c in p.metadata_columns:
            if c == p.on[1] and not p.derive_key:
                continue
            p.renamed[c] = META_PREFIX + c if c in available else c
        available |= set(p.renamed.values())
    needed = {c for r in rules for c in r.columns()}
    missing = sorted(needed - available)
    if missing:
        raise CurationError(f"the rules need columns that neither table has: {missing} (columns: {', '.join(sorted(available))})")
    if unmatched_scores not in ("reject", "ignore"):
        raise CurationError(f"unmatched_scores must be 'reject' or 'ignore', got {unmatched_scores!r}")
    return p


def select_model(con, p: Plan) -> tuple[str | None, dict[str, int]]:
    """The model whose scores are curated: ``p.model`` (a full ``name@hash`` or a config name that names
    one), or the only model in the table. Several models and no choice is an error."""
    table = scan(p.score_files)
    counts = dict(con.execute(f"SELECT model, count(*) FROM {table} GROUP BY model ORDER BY model").fetchall())
    if p.model is None:
        if len(counts) > 1:
            raise CurationError(f"the score table holds the scores of {len(counts)} models ({', '.join(map(str, counts))}): "
                                "choose one with --model")
        return (next(iter(counts)) if counts else None), counts
    matches = [m for m in counts if m == p.model or str(m).split("@", 1)[0] == p.model]
    if len(matches) != 1:
        raise CurationError(f"--model {p.model!r} matches {len(matches)} of the models in the score table: {', '.join(map(str, counts))}")
    return matches[0], counts


# -- the run -------------------------------------------------------------------------------------------------
def curated_sql(p: Plan, model: str | None) -> str:
    """The whole pipeline as one query: every input row once, with _rejected_by/_reason (NULL when kept)."""
    key, meta_key = p.on
    scores = (
        f"SELECT *, row_number() OVER (PARTITION BY {quote(key)} ORDER BY {CURRENT_ROW_ORDER}) AS _dup "
        f"FROM {scan(p.score_files)}"
        + (f" WHERE model = {literal(model)}" if model is not None else "")
    )
    ctes = [f"scores AS ({scores})"]
    if p.metadata:
        if p.derive_key:  # each row's image_id as the scoring job derived it (manifests.image_ids)
            key_expr = DERIVED_ID
        else:
            key_expr = f"CAST({quote(meta_key)} AS VARCHAR)"
        cols = ", ".join(f"{quote(c)} AS {quote(new)}" for c, new in p.renamed.items())
        ctes.append(
            f"meta AS (SELECT {key_expr} AS _key, {cols + ', ' if cols else ''}"
            f"row_number() OVER (PARTITION BY {key_expr} ORDER BY _file, _row) AS _mdup "
            f"FROM {METADATA_TABLE})"
        )
        meta_cols = ", ".join(f"m.{quote(new)}" for new in p.renamed.values())
        meta_cols = ", " + meta_cols if meta_cols else ""
        no_meta = "m._key IS NULL"
        joined = (
            f"SELECT s.* EXCLUDE (_dup){meta_cols}, "
            f"CASE WHEN s._dup > 1 THEN 'duplicate_score' WHEN {no_meta} THEN 'no_metadata' END AS _rejected_by, "
            f"CASE WHEN s._dup > 1 THEN 'scored more than once; the ok, else the latest, row is used' "
            f"WHEN {no_meta} THEN 'no metadata row for this id' END AS _reason "
            f"FROM scores s LEFT JOIN meta m ON CAST(s.{quote(key)} AS VARCHAR) = m._key AND m._mdup = 1"
            + (f" WHERE NOT ({no_meta})" if p.unmatched_scores == "ignore" else "")
        )
        orphans = (
            f"SELECT m._key AS {quote(key)}{meta_cols}, "
            f"CASE WHEN m._mdup > 1 THEN 'duplicate_metadata' ELSE 'no_score' END AS _rejected_by, "
            f"CASE WHEN m._key IS NULL THEN 'metadata row without a key' WHEN m._mdup > 1 THEN "
            f"'metadata key seen more than once; its first row is used' ELSE 'no score row for this id' END AS _reason "
            f"FROM meta m LEFT JOIN (SELECT DISTINCT CAST({quote(key)} AS VARCHAR) AS k FROM scores) s ON s.k = m._key "
            f"WHERE m._mdup > 1 OR s.k IS NULL"
        )
        ctes.append(f"stage0 AS ({joined} UNION ALL BY NAME {orphans})")
    else:
        ctes.append(
            "stage0 AS (SELECT * EXCLUDE (_dup), CASE WHEN _dup > 1 THEN 'duplicate_score' END AS _rejected_by, "
            "CASE WHEN _dup > 1 THEN 'scored more than once; the ok, else the latest, row is used' END AS _reason FROM scores)"
        )
    for i, rule in enumerate(p.rules, start=1):
        ctes.append(f"stage{i} AS ({rule.sql(f'stage{i - 1}')})")
    return "WITH " + ",\n".join(ctes) + f"\nSELECT * FROM stage{len(p.rules)}"


def _write(con, query: str, output_uri: str, rows_per_file: int) -> int:
    """Streams a query's result into Parquet parts of at most ``rows_per_file`` rows (each written atomically)."""
    reader = con.sql(query).to_arrow_reader(min(rows_per_file, 1 << 17))
    run = uuid.uuid4().hex[:8]
    pending, n_pending, part, total = [], 0, 0, 0

    def flush(batches):
        nonlocal part
        write_part_atomically(pa.Table.from_batches(batches, reader.schema), output_uri, f"part-{run}-{part:05d}.parquet")
        part += 1

    for batch in reader:
        pending.append(batch)
        n_pending += batch.num_rows
        total += batch.num_rows
        if n_pending >= rows_per_file:
            flush(pending)
            pending, n_pending = [], 0
    if pending or part == 0:  # an empty result still leaves one file with the schema
        flush(pending)
    return total


def check_filter_output(scores: str, output: str) -> None:
    """A filter's output is a directory of its own: never the score table or inside it (its summary would
    replace the table's), nor a non-empty directory holding anything but a previous filter's output (a re-run
    replaces that whole)."""
    import fsspec

    exists = check_output_location(output, "--output")
    fs, out = fsspec.core.url_to_fs(output)
    table = fsspec.core.url_to_fs(scores)[1].rstrip("/")
    out = out.rstrip("/")
    if out == table or out.startswith(table + "/"):
        raise OutputError(f"--output {output} is the score table or inside it: choose a directory of its own")
    if exists:
        ours = {KEPT_DIR, REJECTED_DIR, GROUPS_FILE, SUMMARY_FILE}
        other = sorted(name for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(out, detail=False, refresh=True))
                       if name not in ours)
        if other:
            raise OutputError(f"--output {output} is a non-empty directory that holds no filter output "
                              f"({', '.join(other[:3])}{' ...' if len(other) > 3 else ''}): choose another directory")


def run_filter(
    scores: str,
    output: str,
    rules: list,
    model: str | None = None,
    metadata: str | None = None,
    on: str | None = None,
    unmatched_scores: str = "reject",
    rows_per_file: int = 1_000_000,
    memory_limit: str | None = None,
    temp_dir: str | None = None,
    metadata_is_manifest: bool = False,
    extra_summary: dict | None = None,
) -> dict:
    """Writes OUTPUT/kept/ (the curated manifest), OUTPUT/rejected/ (with rejected_by, reason), OUTPUT/groups.parquet
    (per group counts, with a ``per`` rule) and OUTPUT/_summary.json, last: its presence marks a finished run."""
    import time

    started = time.time()
    check_filter_output(scores, output)
    con = duckdb_connection(memory_limit=memory_limit, temp_dir=temp_dir)
    p = plan(con, scores, rules, model, metadata, on, unmatched_scores, metadata_is_manifest)
    chosen, models = select_model(con, p)
    for name in (SUMMARY_FILE, KEPT_DIR, REJECTED_DIR, GROUPS_FILE):  # a re-run replaces the previous result
        remove_tree(join_uri(output, name))

    con.execute(f"CREATE TEMP TABLE curated AS {curated_sql(p, chosen)}")
    internal = "_rejected_by, _reason"
    kept = _write(con, f"SELECT * EXCLUDE ({internal}) FROM curated WHERE _rejected_by IS NULL",
                  join_uri(output, KEPT_DIR), rows_per_file)
    rejected = _write(con, f"SELECT * EXCLUDE ({internal}), _rejected_by AS rejected_by, _reason AS reason FROM curated "
                      "WHERE _rejected_by IS NOT NULL", join_uri(output, REJECTED_DIR), rows_per_file)
    by_rule = dict(con.execute("SELECT _rejected_by, count(*) FROM curated WHERE _rejected_by IS NOT NULL "
                               "GROUP BY 1 ORDER BY 1").fetchall())
    summary = {
        **(extra_summary or {}),
        "scores": scores, "metadata": metadata, "output": output, "model": chosen,
        "models_in_table": models, "rules": [r.describe() for r in rules],
        "rows": kept + rejected, "kept": kept, "rejected": rejected, "rejected_by": by_rule,
        "join": _join_report(con, p, chosen),
    }
    per = next((r.per for r in rules if getattr(r, "per", None)), None)
    if per:
        summary["per"] = per
        summary.update(_group_report(con, per, [r.name for r in rules], join_uri(output, GROUPS_FILE)))
    summary["elapsed_s"] = round(time.time() - started, 3)
    write_json(json.dumps(summary, indent=2, default=str) + "\n", join_uri(output, SUMMARY_FILE))
    return summary


def _join_report(con, p: Plan, model: str | None) -> dict:
    one = lambda sql: con.execute(sql).fetchall()[0][0]  # noqa: E731 - fetchall finishes the result
    report = {
        "score_rows_of_model": one(f"SELECT count(*) FROM {scan(p.score_files)}"
                                   + (f" WHERE model = {literal(model)}" if model is not None else "")),
        "duplicate_score_rows": one("SELECT count(*) FROM curated WHERE _rejected_by = 'duplicate_score'"),
    }
    if p.metadata:
        report.update(
            metadata_rows=one(f"SELECT count(*) FROM {METADATA_TABLE}"),
            key="derived from the manifest's id / uri" if p.derive_key else f"{p.on[0]} = metadata.{p.on[1]}",
            scores_without_metadata=one("SELECT count(*) FROM curated WHERE _rejected_by = 'no_metadata'"),
            metadata_without_score=one("SELECT count(*) FROM curated WHERE _rejected_by = 'no_score'"),
            duplicate_metadata_rows=one("SELECT count(*) FROM curated WHERE _rejected_by = 'duplicate_metadata'"),
            renamed_metadata_columns={c: n for c, n in p.renamed.items() if c != n},
        )
        if p.unmatched_scores == "ignore":
            report["scores_out_of_scope"] = report["score_rows_of_model"] - one(
                "SELECT count(*) FROM curated WHERE _rejected_by IS DISTINCT FROM 'no_score' "
                "AND _rejected_by IS DISTINCT FROM 'duplicate_metadata'")
    return report


def _group_report(con, per: str, rule_names: list[str], groups_uri: str) -> dict:
    """Per group: rows, kept, and rejected by each rule; in the summary when there are few groups, always
    in groups.parquet."""
    counts = ", ".join(
        ["count(*) FILTER (WHERE _rejected_by IS NULL) AS kept"]
        + [f"count(*) FILTER (WHERE _rejected_by = {literal(r)}) AS {quote('rejected_' + r)}" for r in rule_names]
    )
    table = con.sql(
        f"SELECT CAST({quote(per)} AS VARCHAR) AS {quote('group')}, count(*) AS rows, {counts} "
        f"FROM curated WHERE _rejected_by IS NULL OR _rejected_by IN ({', '.join(literal(r) for r in rule_names)}) "
        f"GROUP BY 1 ORDER BY 1 NULLS LAST"
    ).to_arrow_table()
    write_part_atomically(table, groups_uri.rsplit("/", 1)[0], groups_uri.rsplit("/", 1)[1])
    report = {"groups": table.num_rows, "groups_with_none_kept": sum(1 for k in table["kept"].to_pylist() if k == 0)}
    if table.num_rows <= MAX_GROUPS_IN_SUMMARY:
        report["per_group"] = {
            ("NULL" if r["group"] is None else r["group"]): {k: v for k, v in r.items() if k != "group"}
            for r in table.to_pylist()
        }
    return report
