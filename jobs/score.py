"""Score a manifest of images with MA-AGIQA on Ray Data and write a Parquet score table.

    python -m jobs.score --manifest URI --output URI [--model NAME_OR_DIR] ...
    ray job submit --working-dir . -- python -m jobs.score --manifest s3://... --output s3://...

Without --address (and without RAY_ADDRESS, which `ray job submit` sets) it starts a local Ray.
Re-running the same command resumes: only rows whose image_id the output does not hold for this model (config
name @ weights hash) are scored, so one score table can also collect the scores of several models.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import fields

from jobs.cli import storage_cause, storage_failure
from ma_agiqa.errors import JobConfigError
from ma_agiqa.manifests import ManifestError
from ma_agiqa.scoring import SUMMARY_FILE, ScoreRequest, score
from ma_agiqa.scoring.monitor import NO_CUDA
from ma_agiqa.scoring.request import FUSE_CHOICES
from ma_agiqa.uris import join_uri, redact

DEFAULTS = {f.name: f.default for f in fields(ScoreRequest)}  # one place for each default: the request's


def column_list(text: str) -> list[str]:
    """--keep-columns a,b -> ["a", "b"]."""
    return [c.strip() for c in text.split(",") if c.strip()]


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of a scoring run besides its manifest and output (shared with jobs.curate)."""
    p.add_argument("--model", default=DEFAULTS["model"],
                   help="a registered model name, or a checkpoint directory (local, or on object storage: s3://bucket/ckpt/)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="score with heads that were never trained (random weights: tests and smoke runs)")
    p.add_argument("--image-root", default=DEFAULTS["image_root"], help="URI that relative manifest uris are resolved against; every uri must lie inside it")
    p.add_argument("--allow-outside-root", action="store_true", help="with --image-root, accept absolute uris outside it")
    p.add_argument("--address", default=DEFAULTS["address"], help="Ray address; default RAY_ADDRESS, else a local Ray")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="images per model batch")
    p.add_argument("--semantic-actors", type=int, default=DEFAULTS["semantic_actors"],
                   help="actors hosting the MLLM; default: 3/4 of the cluster's GPU slots, 1 without GPUs")
    p.add_argument("--quality-actors", type=int, default=DEFAULTS["quality_actors"],
                   help="actors hosting MANIQA + MoE (the whole model when fused); default: the GPU slots the MLLM leaves, else one per CPU (at most 8)")
    p.add_argument("--gpus-per-actor", type=float, default=DEFAULTS["gpus_per_actor"],
                   help="GPUs per model actor (fractions allowed); default 1 if the cluster has 2+ GPUs, 0.5 with one, else 0. "
                        "Give it on a cluster that scales GPU workers from zero")
    p.add_argument("--wait-for-cluster", type=float, default=DEFAULTS["wait_for_cluster"],
                   help="seconds to wait for a cluster to scale up to the job's actors (asked of its autoscaler)")
    p.add_argument("--cpus-per-actor", type=float, default=DEFAULTS["cpus_per_actor"], help="CPUs reserved per model actor; default 1 with GPUs, 0.5 on CPU only")
    p.add_argument("--threads-per-actor", type=int, default=DEFAULTS["threads_per_actor"], help="torch CPU threads per model actor; default: the CPUs it reserves, at least 1")
    p.add_argument("--fuse", choices=FUSE_CHOICES, default=DEFAULTS["fuse"],
                   help="run both model stages in one actor pool of --quality-actors actors; auto: on when the cluster has no GPU")
    p.add_argument("--keep-columns", type=column_list, default=[], help="comma-separated manifest columns to copy into the score table")
    p.add_argument("--prompt-column", default=DEFAULTS["prompt_column"],
                   help="manifest column with the generation prompt, for a model with a prompt expert (default 'prompt'; '' scores without prompts)")
    p.add_argument("--keep-features", action="store_true", help="also write the semantic vectors (float16)")
    p.add_argument("--limit", type=int, default=DEFAULTS["limit"], help="score only the first N manifest rows")
    p.add_argument("--max-bytes", type=int, default=DEFAULTS["max_bytes"], help="objects larger than this are error rows, refused before they are read")
    p.add_argument("--max-pixels", type=int, default=DEFAULTS["max_pixels"], help="images with more pixels are error rows, refused before decoding")
    p.add_argument("--retry-errors", action="store_true", help="also score again the rows whose error is permanent (missing, not_image, ...)")
    p.add_argument("--max-error-fraction", type=float, default=DEFAULTS["max_error_fraction"],
                   help="exit 3 (summary written) when more than this fraction of the run's rows are errors")
    p.add_argument("--shared-filesystem", action="store_true",
                   help="a local --output path is shared storage mounted on every node (else refused on a cluster of several nodes)")
    p.add_argument("--s3-endpoint", default=DEFAULTS["s3_endpoint"], help="endpoint of an S3-compatible store (sets AWS_ENDPOINT_URL)")
    p.add_argument("--min-rows-for-error-fraction", type=int, default=DEFAULTS["min_rows_for_error_fraction"],
                   help="judge --max-error-fraction while the job runs once this many rows are done, and stop it early (exit 3) "
                        "when over; default 200, or two batches per model actor where that is more")
    p.add_argument("--max-failed-batches", type=int, default=DEFAULTS["max_failed_batches"],
                   help="stop the job (exit 3) when a model stage fails on every row of this many batches in a row (a broken model); 0: never")
    p.add_argument("--allow-cpu-fallback", action="store_true",
                   help="let a model actor that Ray gave a GPU run on CPU when its torch sees no CUDA device (default: the job stops, exit 2)")
    p.add_argument("--connect-timeout", type=float, default=DEFAULTS["connect_timeout"], help="seconds to connect to an object store, per request")
    p.add_argument("--read-timeout", type=float, default=DEFAULTS["read_timeout"], help="seconds an object store may send nothing, per request")
    p.add_argument("--fetch-timeout", type=float, default=DEFAULTS["fetch_timeout"],
                   help="seconds to read one image from an object store, retries included (0: no deadline); over it, the row is a 'timeout' error")
    p.add_argument("--image-column", default=DEFAULTS["image_column"],
                   help="the input is Parquet holding the images in this column (struct {bytes, path} as Hugging Face "
                        "datasets write it, or binary); scored from the bytes, which never reach the score table")
    p.add_argument("--id-column", default=DEFAULTS["id_column"],
                   help="with --image-column: the column of image ids (default: a SHA-1 of each image's bytes, which "
                        "means the driver reads the images once to plan)")
    p.add_argument("--prompt-from", choices=("sidecar", "metadata"), default=DEFAULTS["prompt_from"],
                   help="a folder of images: prompts from sidecar files (a.txt, or a field of a.json: --prompt-column, "
                        "default prompt then caption), or from each PNG's own text chunks (Automatic1111 'parameters', "
                        "ComfyUI 'prompt'), then sidecars")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--manifest", help="a Parquet/CSV/JSONL manifest (a file, a directory or a glob), a folder of images, "
                                           "Parquet with images (--image-column), or WebDataset .tar shards (a file, a directory, "
                                           "a glob or a brace pattern like shards/{00000..00099}.tar); local, file://, s3://, gs://")
    inputs.add_argument("--images", help="a folder or glob of images (local or s3://): each image a row, its id its path "
                                         "relative to the folder")
    p.add_argument("--output", required=True, help="directory URI of the score table (Parquet parts)")
    add_scoring_args(p)
    p.add_argument("--rows-per-file", type=int, default=DEFAULTS["rows_per_file"], help="rows per output Parquet part")
    return p.parse_args(argv)


# The request's fields that add_scoring_args parses; manifest, output, rows_per_file and input_kind are each job's own.
SCORING_OPTIONS = [f.name for f in fields(ScoreRequest) if f.name not in ("manifest", "output", "rows_per_file", "input_kind")]


def request_from(args: argparse.Namespace, manifest: str, output: str, **given) -> ScoreRequest:
    """The ScoreRequest of add_scoring_args' parsed options (shared with jobs.curate) for this manifest and
    output; ``given`` sets the other fields."""
    return ScoreRequest(manifest=manifest, output=output, **{name: getattr(args, name) for name in SCORING_OPTIONS}, **given)


def run(args: argparse.Namespace) -> dict:
    """``ma_agiqa.scoring.score`` of parse_args' options: the run's summary."""
    images = getattr(args, "images", None)
    return score(request_from(args, images or args.manifest, args.output, rows_per_file=args.rows_per_file,
                              input_kind="images" if images else "auto"))


class _Interrupts:
    """Ctrl-C while the job runs: raises KeyboardInterrupt as Python's own handler does, and remembers it, so a
    run whose KeyboardInterrupt was swallowed on its way out (it can land in Ray's cleanup code, where Python
    only prints it) still ends as interrupted instead of exiting 0."""

    def __init__(self):
        self.seen, self._previous = False, None

    def _handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def show_extremes(output: str, model_id: str) -> None:
    """Where to look first: this model's best and worst scored images, and how to read the whole table."""
    from ma_agiqa.score_table import extremes

    ends = extremes(output, model_id)
    for name in ("best", "worst"):
        print(f"{name}: " + ", ".join(f"{r['score']:.2f} {redact(r['uri'] or r['image_id'])}" for r in ends[name]))
    print(f"all scores: python -c \"import ma_agiqa; print(ma_agiqa.read_scores('{redact(output)}').to_pandas())\"")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3"):  # their INFO lines would bury the job's own
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        with _Interrupts() as interrupts:
            summary = run(args)
            if interrupts.seen:
                raise KeyboardInterrupt
    except ManifestError as e:
        print(f"error: bad manifest: {e}", file=sys.stderr)
        return 2
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the parts written so far are kept; run the same command again to resume into {redact(args.output)}",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a storage failure, however Ray wrapped it, is one line; the rest re-raised
        if (cause := storage_cause(e)) is None:
            raise
        print(f"{storage_failure(cause)}; the parts written so far are kept, run the same command again to resume",
              file=sys.stderr)
        return 3
    stopped = summary.get("stopped_early")
    if stopped and stopped["kind"] == NO_CUDA:  # a refusal, like a bad option: one line
        print(f"error: {stopped['reason']}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["to_score"] == 0:
        print(f"nothing to do: all {summary['already_scored']} rows of the manifest are already in {redact(args.output)}")
    print(f"score table: {summary['output']} ({summary['table_rows']} rows; summary in {join_uri(summary['output'], SUMMARY_FILE)})")
    if summary.get("ok"):
        show_extremes(args.output, summary["model_id"])
    if stopped:
        print(f"error: stopped early after {summary['rows']} rows written: {stopped['reason']}; the parts written are kept, "
              f"run the same command again to resume", file=sys.stderr)
        return 3
    if summary["failed"]:
        print(f"error: {summary['errors']} of {summary['rows']} rows failed ({summary['error_fraction']:.1%}), over "
              f"--max-error-fraction {args.max_error_fraction:g}; errors by kind: {summary['errors_by_kind']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
