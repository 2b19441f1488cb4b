"""jobs.report: the HTML opens in a real headless Chromium with its charts and every thumbnail decoded."""
import re
import shutil
import subprocess


from helpers import REQUIRE_BROWSER, SAMPLE, read_table, sample_rows, unavailable, write_scores
from jobs import report


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        unavailable("no chromium on this machine (apt-get install chromium; .ci/run does)", REQUIRE_BROWSER)
    return path


def render_dom(html_path) -> str:
    """The DOM after Chromium loaded the page (and its load handler ran)."""
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_renders_charts_and_thumbnails_in_chromium(tmp_path):
    rows = sample_rows()[:30]
    table = [{"image_id": r["id"], "uri": str(SAMPLE / r["uri"]), "score": 1.0 + i / 10, "prompt": r["prompt"],
              "generator": r["generator"]} for i, r in enumerate(rows)]
    table[4]["uri"] = str(tmp_path / "deleted-since.jpg")  # scored once, gone now: a placeholder, not a crash
    table += [{"image_id": "bad1", "score": None, "uri": "x.jpg"}, {"image_id": "bad2", "score": None, "uri": "y.jpg"}]
    scores = write_scores(tmp_path / "scores", table, keep=("prompt", "generator"))
    out = tmp_path / "report.html"
    # 30 scored images, 3 per decile: with 3 thumbnails per decile every image is shown
    assert report.main(["--scores", scores, "--output", str(out), "--thumbs-per-decile", "3"]) == 0
    page = out.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page), "the report must not load anything from outside"
    dom = render_dom(out)
    assert len(re.findall(r'<img class="thumb"', dom)) == 29
    assert re.search(r'data-thumbnails-decoded="29"', dom)
    assert dom.count('class="missing"') == 1 and "missing: no such object" in dom
    for chart in ("histogram", "by-generator", "gates", "errors"):
        assert re.search(rf'id="chart-{chart}"><svg', dom), chart
    assert "by-prompt" not in dom  # prompts are captions, not a grouping
    assert len(re.findall(r'class="decile"', dom)) == 10
    assert rows[0]["prompt"] in dom
    assert re.search(r"<td>missing</td><td>2</td>", dom)


def test_report_groups_by_joined_metadata(tmp_path):
    rows = sample_rows()[:12]
    scores = write_scores(tmp_path / "scores", [
        {"image_id": r["id"], "uri": r["uri"], "score": float(i)} for i, r in enumerate(rows)], keep=())
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text((SAMPLE / "manifest.jsonl").read_text())
    out = tmp_path / "r.html"
    stats = report.run(report.parse_args(["--scores", scores, "--metadata", str(manifest), "--image-root", str(SAMPLE),
                                          "--output", str(out), "--group-by", "generator", "--thumbs-per-decile", "1"]))
    assert stats["groups"] == ["generator"] and stats["thumbnails"] == 10 and stats["thumbnails_failed"] == 0
    assert 'chart-by-generator' in out.read_text() and rows[0]["prompt"] in out.read_text()
    assert report.main(["--scores", scores, "--output", str(out), "--group-by", "nope"]) == 2
    assert len(read_table(scores)) == 12


def test_report_on_a_table_without_scored_images_says_so(tmp_path, capsys):
    """All rows are errors: no distribution to draw, the page says so and still counts the errors by kind."""
    scores = write_scores(tmp_path / "scores", [("a", None, "a fox"), ("b", None, "a cat"), ("c", None, None)])
    out = tmp_path / "report.html"
    assert report.main(["--scores", scores, "--output", str(out)]) == 0
    assert "no scored images: 3 rows, all errors" in capsys.readouterr().out
    page = out.read_text()
    assert "No scored images: 3 rows, all errors." in page and "3 rows, 0 scored, 3 errors" in page
    assert re.search(r"<td>missing</td><td>3</td>", page) and "id='chart-errors'><svg" in page
    assert "chart-histogram" not in page and "class='decile'" not in page


def test_report_on_an_empty_table_says_so(tmp_path, capsys):
    scores = write_scores(tmp_path / "scores", [])
    out = tmp_path / "report.html"
    assert report.main(["--scores", scores, "--output", str(out), "--group-by", "prompt"]) == 0
    assert "the table is empty" in capsys.readouterr().out
    page = out.read_text()
    assert "The table is empty: it holds no rows." in page and "0 rows, 0 scored, 0 errors" in page
    assert "class='decile'" not in page and "<td>" not in page
