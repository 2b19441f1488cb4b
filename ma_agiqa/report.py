"""A one-file HTML report of a score table: what a threshold keeps and drops, seen.

Aggregates come from DuckDB over the whole table (so a table of millions of rows costs one pass); only the
thumbnails' images are fetched, a fixed sample per score decile. Charts are matplotlib SVG inlined in the
page and thumbnails are JPEG data URIs: the file opens offline, from anywhere, with nothing beside it.
"""
from __future__ import annotations

import base64
import html
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .curation import CurationError, curated_sql, plan, quote, select_model
from .images import ImageError, decode_image
from .fetch import Fetcher
from .table_files import duckdb_connection
from .uris import resolve_image_uri

NOT_GROUPS = {"image_id", "uri", "status", "error", "scored_at", "width", "height", "score"}
MAX_GROUP_VALUES = 40  # a column with more distinct values (prompts, seeds) is not a box-plot grouping


@dataclass
class Thumb:
    decile: int
    image_id: str
    score: float
    prompt: str | None
    data_uri: str | None
    error: str | None = None


def _scalar(con, sql):
    return con.execute(sql).fetchall()[0][0]


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width=7.5, height=3.2):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt.subplots(figsize=(width, height))


def histogram_chart(con, deciles: list[float]) -> str:
    lo, hi = con.execute("SELECT min(score), max(score) FROM r WHERE status = 'ok'").fetchall()[0]
    fig, ax = _figure()
    if lo is None:
        ax.text(0.5, 0.5, "no scored image", ha="center", transform=ax.transAxes)
        return _svg(fig)
    bins = 40
    width = (hi - lo) / bins or 1.0
    counts = dict(con.execute(
        f"SELECT least(CAST(floor((score - {lo!r}) / {width!r}) AS INT), {bins - 1}) AS b, count(*) FROM r "
        "WHERE status = 'ok' GROUP BY b").fetchall())
    ax.bar([lo + (b + 0.5) * width for b in range(bins)], [counts.get(b, 0) for b in range(bins)], width=width * 0.95,
           color="#4a78b5")
    for q in deciles:
        ax.axvline(q, color="#c0392b", lw=0.8, ls=":")
    ax.set_xlabel("score (dotted: decile boundaries)")
    ax.set_ylabel("images")
    return _svg(fig)


def group_columns(con, columns: list[str], requested: list[str] | None, prompt_column: str | None) -> list[str]:
    """The requested columns, or every column with 2-40 values and several rows per value (not prompts)."""
    if requested:
        missing = [c for c in requested if c not in columns]
        if missing:
            raise CurationError(f"--group-by names columns the tables lack: {missing} (columns: {', '.join(columns)})")
        return requested
    chosen = []
    rows = _scalar(con, "SELECT count(*) FROM r")
    for c in columns:
        if c in NOT_GROUPS or c == prompt_column or c.startswith(("gate_", "feature_", "_")):
            continue
        n = _scalar(con, f"SELECT count(DISTINCT {quote(c)}) FROM r")
        if 2 <= n <= MAX_GROUP_VALUES and n <= rows / 2:
            chosen.append(c)
    return chosen


def box_chart(con, column: str, max_groups: int = 25) -> str:
    rows = con.execute(
        f"SELECT coalesce(CAST({quote(column)} AS VARCHAR), 'NULL') AS g, count(*) AS n, min(score), "
        "quantile_cont(score, 0.25), median(score), quantile_cont(score, 0.75), max(score), avg(score) "
        f"FROM r WHERE status = 'ok' GROUP BY g ORDER BY n DESC, g LIMIT {max_groups}").fetchall()
    rows.sort(key=lambda r: r[4])
    stats = []
    for g, n, mn, q1, med, q3, mx, mean in rows:
        iqr = q3 - q1
        stats.append({"label": f"{g} ({n})", "q1": q1, "med": med, "q3": q3, "mean": mean,
                      "whislo": max(mn, q1 - 1.5 * iqr), "whishi": min(mx, q3 + 1.5 * iqr), "fliers": []})
    fig, ax = _figure(7.5, max(1.6, 0.32 * len(stats) + 0.8))
    if stats:
        ax.bxp(stats, orientation="horizontal", showmeans=True, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "#dbe6f4"}, meanprops={"marker": "D", "markersize": 3})
    ax.set_xlabel(f"score by {column} (sorted by median; whiskers 1.5 IQR; diamond: mean)")
    return _svg(fig)


def gates_chart(con, gates: list[str]) -> str:
    fig, ax = _figure()
    bins = 20
    for g in gates:
        counts = dict(con.execute(
            f"SELECT least(CAST(floor({quote(g)} * {bins}) AS INT), {bins - 1}) AS b, count(*) FROM r "
            f"WHERE {quote(g)} IS NOT NULL GROUP BY b").fetchall())
        xs = [(b + 0.5) / bins for b in range(bins)]
        ax.plot(xs, [counts.get(b, 0) for b in range(bins)], marker="o", ms=3, label=g.removeprefix("gate_"))
    ax.set_xlim(0, 1)
    ax.set_xlabel("gate weight (the MoE's share of each expert in a score)")
    ax.set_ylabel("images")
    if gates:
        ax.legend(frameon=False)
    return _svg(fig)


def errors_table(con) -> list[tuple[str, int]]:
    return con.execute(
        "SELECT split_part(error, ':', 1) AS kind, count(*) AS n FROM r WHERE status <> 'ok' "
        "GROUP BY kind ORDER BY n DESC, kind").fetchall()


def errors_chart(kinds: list[tuple[str, int]]) -> str:
    fig, ax = _figure(7.5, max(1.4, 0.3 * len(kinds) + 0.8))
    if kinds:
        from matplotlib.ticker import MaxNLocator

        ax.barh([k for k, _ in kinds][::-1], [n for _, n in kinds][::-1], color="#c0392b")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("error rows by kind")
    else:
        ax.text(0.5, 0.5, "no error rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    return _svg(fig)


def thumbnails(con, prompt_column: str | None, per_decile: int, image_root: str | None, size: int) -> list[Thumb]:
    """``per_decile`` images of each score decile, a fixed sample (by a hash of the image id)."""
    prompt = quote(prompt_column) if prompt_column else "NULL"
    rows = con.execute(
        f"SELECT decile, image_id, uri, score, {prompt} FROM ("
        f"  SELECT *, row_number() OVER (PARTITION BY decile ORDER BY hash(image_id), image_id) AS k FROM ("
        f"    SELECT *, ntile(10) OVER (ORDER BY score, image_id) AS decile FROM r WHERE status = 'ok'))"
        f" WHERE k <= {int(per_decile)} ORDER BY decile, score").fetchall()
    fetcher = Fetcher()

    def one(row) -> Thumb:
        decile, image_id, uri, score, text = row
        try:
            img = decode_image(fetcher.fetch(resolve_image_uri(uri, image_root)))
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=72)
            data = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            return Thumb(decile, image_id, score, text, data)
        except ImageError as e:
            return Thumb(decile, image_id, score, text, None, f"{e.kind}: {e.message}")
        except Exception as e:  # noqa: BLE001 - a broken thumbnail must not lose the report
            return Thumb(decile, image_id, score, text, None, f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, rows))


def build_report(
    scores: str,
    metadata: str | None = None,
    on: str | None = None,
    model: str | None = None,
    image_root: str | None = None,
    group_by: list[str] | None = None,
    prompt_column: str | None = None,
    thumbs_per_decile: int = 8,
    thumb_size: int = 160,
) -> tuple[str, dict]:
    """The report's HTML and the figures it shows (for a caller that wants to print or check them)."""
    con = duckdb_connection()
    p = plan(con, scores, [], model, metadata, on)
    chosen, _ = select_model(con, p)
    # Every score row of the model once (duplicates resolved as the filter does), metadata joined when given.
    con.execute(f"CREATE TEMP TABLE r AS SELECT * EXCLUDE (_rejected_by, _reason) FROM ({curated_sql(p, chosen)}) "
                "WHERE _rejected_by IS NULL OR _rejected_by = 'no_metadata'")
    columns = [c[0] for c in con.execute("DESCRIBE r").fetchall()]
    gates = [c for c in columns if c.startswith("gate_")]
    if prompt_column is None:
        prompt_column = next((c for c in ("prompt", "meta_prompt") if c in columns), None)
    elif prompt_column not in columns:
        raise CurationError(f"--prompt-column {prompt_column!r} is not a column (columns: {', '.join(columns)})")
    n, ok = con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'ok') FROM r").fetchall()[0]
    deciles = con.execute("SELECT quantile_cont(score, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]) FROM r "
                          "WHERE status = 'ok'").fetchall()[0][0] or []
    groups = group_columns(con, columns, group_by, prompt_column)
    kinds = errors_table(con)
    thumbs = thumbnails(con, prompt_column, thumbs_per_decile, image_root, thumb_size) if ok else []
    stats = {"rows": n, "ok": ok, "errors": n - ok, "model": chosen, "deciles": deciles, "groups": groups,
             "errors_by_kind": dict(kinds), "thumbnails": len(thumbs),
             "thumbnails_failed": sum(t.data_uri is None for t in thumbs), "note": empty_note(n, ok)}
    charts = []
    if ok:  # without a scored image there is no distribution to draw, only the errors
        charts += [("histogram", "Score distribution", histogram_chart(con, deciles))]
        charts += [(f"by-{c}", f"Score by {c}", box_chart(con, c)) for c in groups]
        charts += [("gates", "Gate weights", gates_chart(con, gates))]
    charts += [("errors", "Errors by kind", errors_chart(kinds))]
    return render(scores, stats, charts, kinds, thumbs, deciles), stats


def empty_note(rows: int, ok: int) -> str | None:
    """What the report says in place of its charts when the table holds nothing to chart."""
    if rows == 0:
        return "the table is empty: it holds no rows"
    if ok == 0:
        return f"no scored images: {rows:,} {'row' if rows == 1 else 'rows'}, all errors"
    return None


def render(scores: str, stats: dict, charts, kinds, thumbs: list[Thumb], deciles: list[float]) -> str:
    e = html.escape
    bounds = [None, *deciles, None]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>ma-agiqa report: {e(scores)}</title><style>{CSS}</style></head><body>",
        f"<h1>Score report</h1><p class='meta'>{e(scores)} &middot; model <code>{e(str(stats['model'] or 'none'))}</code> &middot; "
        f"{stats['rows']:,} rows, {stats['ok']:,} scored, {stats['errors']:,} errors</p>",
    ]
    if stats.get("note"):
        parts.append(f"<p class='note' id='note'>{e(stats['note'][0].upper() + stats['note'][1:])}.</p>")
    for chart_id, title, svg in charts:
        parts.append(f"<section><h2>{e(title)}</h2><figure class='chart' id='chart-{e(chart_id)}'>{svg}</figure>")
        if chart_id == "errors" and kinds:
            parts.append("<table><tr><th>kind</th><th>rows</th></tr>"
                         + "".join(f"<tr><td>{e(k)}</td><td>{n:,}</td></tr>" for k, n in kinds) + "</table>")
        parts.append("</section>")
    if not stats["ok"]:
        parts.append("</body></html>")
        return "\n".join(parts)
    parts.append("<section><h2>Images by score decile</h2><p class='meta'>A fixed sample of each tenth of the scored "
                 "images, lowest first: what a threshold at a decile boundary drops (above) and keeps (below).</p>")
    for d in range(1, 11):
        cell = [t for t in thumbs if t.decile == d]
        lo, hi = bounds[d - 1], bounds[d]
        span = f"{'min' if lo is None else f'{lo:.3f}'} to {'max' if hi is None else f'{hi:.3f}'}"
        parts.append(f"<div class='decile' id='decile-{d}'><h3>Decile {d} <span>score {span}</span></h3><div class='grid'>")
        for t in cell:
            img = (f"<img class='thumb' src='{t.data_uri}' alt='{e(t.image_id, quote=True)}'>" if t.data_uri
                   else f"<div class='missing'>{e(t.error or '')}</div>")
            parts.append(f"<figure>{img}<figcaption><b>{t.score:.3f}</b> {e(t.prompt or '')}"
                         f"<br><small>{e(t.image_id)}</small></figcaption></figure>")
        parts.append("</div></div>")
    parts.append("</section>")
    # Marks how many thumbnails the browser decoded (read by the test; harmless to a reader).
    parts.append("<script>addEventListener('load',()=>{document.body.dataset.thumbnailsDecoded="
                 "[...document.images].filter(i=>i.classList.contains('thumb')&&i.naturalWidth>0).length})</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd}h3{margin:16px 0 6px;font-size:15px}
h3 span{color:#777;font-weight:normal;font-size:13px}.meta{color:#555}
.note{background:#fdf3e1;border:1px solid #e8c98f;padding:8px 12px;border-radius:3px;font-weight:600}
figure.chart{margin:0}figure.chart svg{max-width:100%;height:auto}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:2px 10px;text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.grid figure{margin:0;font-size:12px}.grid img{width:100%;aspect-ratio:1;object-fit:cover;border-radius:3px}
.missing{aspect-ratio:1;background:#f3e5e5;color:#933;font-size:11px;padding:6px;overflow:hidden}
figcaption small{color:#888}
"""


def chart_ids(stats: dict) -> list[str]:
    """The ids of the charts a report with these stats holds (for checks)."""
    if not stats["ok"]:
        return ["chart-errors"]
    return ["chart-histogram", *[f"chart-by-{c}" for c in stats["groups"]], "chart-gates", "chart-errors"]

