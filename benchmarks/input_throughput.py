"""Scoring throughput by input kind: the same AGIQA-3K images as files + a manifest, as Parquet with the image
bytes (the Hugging Face layout), and as WebDataset tar shards, each scored by jobs.score's library call with
tiny-random on one local Ray.

The three inputs are written first (not timed). A small warm-up run starts Ray's workers, so that start-up is
not charged to the first kind. For each kind: rows/s over the whole call (``wall_rows_per_s``: planning in
the driver included, which for shards means reading them once and for Parquet without ids hashing the images),
the job's own ``images_per_s`` (from Ray up), and the planning time (``plan_s``: the wall time less the job's
elapsed). The question it answers: are bytes in Parquet and tar shards slower per row than files?

    python benchmarks/input_throughput.py [--images 2000] [--shard-size 500] [--row-group 100]
    python benchmarks/input_throughput.py --smoke   # 8 sample images, seconds, to check that it runs
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ma_agiqa.scoring import ScoreRequest, score  # noqa: E402
from _common import local_run  # noqa: E402



def write_inputs(images: list[Path], work: Path, shard_size: int, row_group: int) -> dict[str, dict]:
    """The three inputs of the same images: {kind: the ScoreRequest fields that name it}."""
    with open(work / "manifest.jsonl", "w") as f:
        for p in images:
            f.write(json.dumps({"id": p.stem, "uri": str(p), "prompt": f"prompt of {p.stem}"}) + "\n")
    pq.write_table(pa.table({
        "image": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
        "id": [p.stem for p in images], "prompt": [f"prompt of {p.stem}" for p in images],
    }), work / "images.parquet", row_group_size=row_group)
    shards = work / "shards"
    shards.mkdir()
    for s in range(0, len(images), shard_size):
        with tarfile.open(shards / f"{s // shard_size:05d}.tar", "w") as tar:
            for p in images[s:s + shard_size]:
                key = p.stem.replace(".", "_")  # a WebDataset key ends at its first dot (sd1.5_normal_000 would be sd1)
                for name, data in ((f"{key}.jpg", p.read_bytes()), (f"{key}.txt", f"prompt of {p.stem}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {
        "files": {"manifest": str(work / "manifest.jsonl")},
        "parquet_bytes": {"manifest": str(work / "images.parquet"), "image_column": "image", "id_column": "id"},
        "webdataset": {"manifest": str(shards)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--row-group", type=int, default=100, help="rows per Parquet row group (the datasets library writes 100s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="8 sample images, shards of 3, row groups of 2: checks that it runs")
    args = p.parse_args(argv)
    n, shard_size, row_group = (8, 3, 2) if args.smoke else (args.images, args.shard_size, args.row_group)
    with local_run(n, args.smoke, "input-bench-") as (images, work):
        inputs = write_inputs(images, work, shard_size, row_group)
        warm = work / "warmup.jsonl"
        warm.write_text("".join(json.dumps({"uri": str(p)}) + "\n" for p in images[:2]))
        score(ScoreRequest(manifest=str(warm), output=str(work / "warmup-out"), model="tiny-random", allow_untrained=True))
        result = {"images": n, "image_mb": round(sum(p.stat().st_size for p in images) / 2**20, 1),
                  "shard_size": shard_size, "row_group": row_group, "model": "tiny-random", "kinds": {}}
        for kind, fields in inputs.items():
            started = time.perf_counter()
            summary = score(ScoreRequest(output=str(work / f"out-{kind}"), model="tiny-random", allow_untrained=True, batch_size=args.batch_size,
                                         keep_columns=["prompt"], **fields))
            wall = time.perf_counter() - started
            assert summary["rows"] == n and summary["table_rows"] == n, summary
            result["kinds"][kind] = {
                "rows": summary["rows"], "errors": summary["errors"], "wall_s": round(wall, 2),
                "wall_rows_per_s": round(n / wall, 1), "images_per_s": summary["images_per_s"],
                "plan_s": round(wall - summary["elapsed_s"], 2),
            }
        base = result["kinds"]["files"]["wall_rows_per_s"]
        for kind, r in result["kinds"].items():
            r["vs_files"] = round(r["wall_rows_per_s"] / base, 2)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
