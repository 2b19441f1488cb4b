"""The scheduled curation run: score what is new in a manifest, append it to the score table, then filter.

    python -m jobs.curate --manifest URI --scores URI --output URI [--model NAME_OR_DIR] [filter options]

1. Scores, as jobs.score does (ma_agiqa.scoring), only the manifest rows the score table does not hold for this model (config name
   and weights hash), appending them to the table. A second run in a row scores nothing and loads no model.
2. Filters the manifest's images with jobs.filter's rules, joined with the manifest itself as metadata (its
   ids derived as the scoring job derives them). Scores of images of other manifests are out of scope
   (counted in the summary, not written).

3. With --compact, compacts the score table first (jobs.compact), so nightly runs do not pile up small parts.
4. With --export-format F --export-output URI, exports the kept images (jobs.export) after the filter.

OUTPUT/_summary.json holds the scoring run's summary under "scoring" (and "compaction"), the filter's beside it.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import USER_ERRORS, run_and_report
from jobs.export import FORMATS, add_shard_size
from jobs.filter import add_rule_args, rules_from
from jobs.score import add_scoring_args, request_from
from ma_agiqa.curation import SUMMARY_FILE, check_filter_output, run_filter
from ma_agiqa.export import run_export
from ma_agiqa.scoring import JobConfigError, score
from ma_agiqa.table_files import write_json
from ma_agiqa.uris import join_uri


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.curate", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="the corpus: a Parquet/CSV/JSONL file, directory or glob")
    p.add_argument("--scores", required=True, help="the score table to complete (created if missing)")
    p.add_argument("--output", required=True, help="where the curated manifest, the rejected rows and the summary go")
    add_scoring_args(p)
    add_rule_args(p)
    p.add_argument("--compact", action="store_true",
                   help="at the end, compact the score table (jobs.compact: its current rows in large parts)")
    p.add_argument("--compact-rows-per-file", type=int, default=1_000_000, help="rows per compacted part")
    p.add_argument("--export-format", choices=FORMATS, default=None, help="then export the kept images (jobs.export)")
    p.add_argument("--export-output", default=None, help="where --export-format writes the exported dataset")
    add_shard_size(p)
    args = p.parse_args(argv)
    if bool(args.export_format) != bool(args.export_output):
        p.error("--export-format and --export-output go together")
    if args.metadata:
        p.error("--metadata: jobs.curate joins the manifest itself; use jobs.filter for another table")
    return args


def run(args) -> dict:
    rules = rules_from(args)  # bad rule options and outputs fail before any scoring
    check_filter_output(args.scores, args.output)
    scored = score(request_from(args, args.manifest, args.scores))
    extra = {"scoring": scored}
    if args.compact and scored.get("table_rows"):
        from ma_agiqa.compaction import compact

        extra["compaction"] = compact(args.scores, args.compact_rows_per_file, args.memory_limit)
    summary = run_filter(
        args.scores, args.output, rules, model=scored["model_id"], metadata=args.manifest, on="image_id",
        unmatched_scores="ignore", rows_per_file=args.rows_per_file, memory_limit=args.memory_limit,
        temp_dir=args.temp_dir, metadata_is_manifest=True, extra_summary=extra,
    )
    if args.export_format:
        summary["export"] = run_export(join_uri(args.output, "kept"), args.export_output, args.export_format,
                                       args.shard_size, image_root=args.image_root,
                                       allow_outside_root=args.allow_outside_root, max_bytes=args.max_bytes)
        write_json(json.dumps(summary, indent=2, default=str) + "\n", join_uri(args.output, SUMMARY_FILE))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    summaries = []

    def run_and_keep(a):
        summaries.append(run(a))
        return summaries[-1]

    code = run_and_report(args, run_and_keep, lambda summary, args: (
        f"scored {summary['scoring']['to_score']} new images; kept {summary['kept']} of {summary['rows']}: "
        f"{args.output.rstrip('/')}/kept/"), errors=(*USER_ERRORS, JobConfigError))
    if code == 0 and summaries and summaries[-1]["scoring"].get("failed"):
        scoring = summaries[-1]["scoring"]
        print(f"error: the scoring run failed {scoring['errors']} of {scoring['rows']} rows, over --max-error-fraction "
              f"{args.max_error_fraction:g}; errors by kind: {scoring['errors_by_kind']}", file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
