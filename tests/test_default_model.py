"""The main job's default model gives real scores with nothing but the base install: no --model, no
--allow-untrained, and scores that rank the sample's images as their human ratings do."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "agiqa3k"


def test_jobs_score_without_a_model_gives_real_scores(tmp_path):
    from ma_agiqa.checkpoint import model_id
    from ma_agiqa.scoring import ScoreRequest

    out = tmp_path / "scores"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE),
         "--output", str(out), "--keep-columns", "prompt"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out).to_pandas()
    default = ScoreRequest("m", "o").model
    assert set(table["model"]) == {model_id(default)} and (table["status"] == "ok").all() and len(table) == 40
    # where to look: the best and worst images of this run, by their uris
    best = next(line for line in proc.stdout.splitlines() if line.startswith("best: "))
    top = table.sort_values("score", ascending=False).iloc[0]
    assert top["uri"] in best and f"{top['score']:.2f}" in best
    with open(SAMPLE / "labels.csv") as f:
        mos = {row["name"].rsplit(".", 1)[0]: float(row["mos_quality"]) for row in csv.DictReader(f)}
    rho = spearmanr(table["score"], [mos[i] for i in table["image_id"]]).statistic
    assert rho > 0.6, rho  # tiny-random's untrained heads rank these at about 0
