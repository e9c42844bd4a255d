"""The report: valid GitHub markdown with every section, valid PNGs, and the `dit-bench report` command."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from PIL import Image

from bench import consistency, report
from bench.errors import UserError

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "results").glob("*.json"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cells(line: str) -> int:
    """Number of cells in a table line: unescaped pipes minus one."""
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def assert_valid_tables(markdown: str) -> int:
    """Every table has a header, a separator and rows of the header's width; markdown-it sees them all."""
    blocks, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    for block in blocks:
        width = _cells(block[0])
        assert width >= 2 and re.fullmatch(r"\|( --- \|)+", block[1]) and _cells(block[1]) == width, block[:2]
        assert all(_cells(line) == width and line.endswith("|") for line in block), block[0]
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    assert sum(t.type == "table_open" for t in tokens) == len(blocks)
    return len(blocks)


def assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100


@pytest.fixture(scope="module")
def built():
    return report.build(FIXTURES)


def test_a_report_renders_from_the_fixture_results(built, tmp_path):
    md_path, pngs = report.write_report(built, tmp_path / "reports" / "fixtures.md")
    markdown = md_path.read_text()
    assert assert_valid_tables(markdown) >= 8
    for section in ("## Summary", "## Plots", "## Protocol cards", "## Environment", "## Warnings recorded by the runs",
                    "## Consistency of the published numbers", "## Tolerances"):
        assert section in markdown
    for path in FIXTURES:
        assert f"### `{path.name}`" in markdown  # one protocol card per result
    assert "NVIDIA A100-SXM4-80GB" in markdown and "proxy task: numbers are not ImageNet numbers" in markdown
    for check in consistency.CHECKS:
        assert f"| {check} |" in markdown
    assert "±max(0.05, 2%) at 50k samples" in markdown
    # a summary row: measured, published, delta, tolerance, verdict and where the number is printed
    assert ("| dit DiT-XL/2@256 | fid | 2.23 | 2.21 | +0.02 | ±0.05 | reproduced | "
            "dit-readme:xl2-256-pytorch-fp32-fid (facebookresearch/DiT README.md @ ed81ce2") in markdown
    assert "| **not reproduced** |" in markdown
    assert set(pngs) == {"speed_fid", "s_per_image", "memory"}
    for name, png in pngs.items():
        assert png.parent == tmp_path / "reports" / "fixtures_files"
        assert f"](fixtures_files/{png.name})" in markdown
        assert_png(png)


def test_not_comparable_rows_keep_their_reasons(built):
    markdown = report.render_markdown(built)
    assert "<summary>Not comparable (" in markdown
    assert "framework: measured pytorch, source jax" in markdown
    assert "compared with papers only through ratios and deltas" in markdown


def test_the_github_summary_variant_has_no_image_links(built, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    report.append_github_summary(built, {"speed_fid": "reports/x_files/speed_fid.png"})
    report.append_github_summary(built)
    text = summary.read_text()
    assert text.count("# dit-bench report") == 2 and "![" not in text  # appended, never overwritten
    assert "`reports/x_files/speed_fid.png`" in text
    assert_valid_tables(text)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    with pytest.raises(UserError, match="GITHUB_STEP_SUMMARY"):
        report.append_github_summary(built)


def test_pareto_front():
    assert report.pareto_front([(3, 4), (1, 5), (4, 1), (2, 3), (5, 2)]) == [(1, 5), (2, 3), (4, 1)]
    assert report.pareto_front([]) == []


def test_markdown_cells_are_escaped():
    text = report.table(["a", "b"], [["x | y", "key_steps mod10<5\nnext"]])
    assert text.splitlines()[2] == "| x \\| y | key_steps mod10&lt;5 next |"
    assert_valid_tables(text)


def test_no_plot_without_the_metrics_it_needs(tmp_path):
    only_train = report.build([p for p in FIXTURES if p.name.startswith("fast_dit")])
    assert set(report.write_plots(only_train, tmp_path)) == {"memory"}  # training: no s/image, no FID


def test_a_bad_result_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "speed"}')
    with pytest.raises(UserError, match="bad.json: field 'schema_version' is missing"):
        report.build([bad])
    with pytest.raises(UserError, match="ending in .md"):
        report.write_report(report.build(FIXTURES[:1]), tmp_path / "x.html")


# ---- command line --------------------------------------------------------------------------------------

def test_cli_report_writes_markdown_and_plots(cli_runner, tmp_path):
    from cli import app

    out = tmp_path / "reports" / "run.md"
    result = cli_runner.invoke(app, ["report", *map(str, FIXTURES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_valid_tables(out.read_text())
    for png in (tmp_path / "reports" / "run_files").iterdir():
        assert_png(png)


def test_cli_report_prints_to_stdout_and_appends_the_job_summary(cli_runner, tmp_path, monkeypatch):
    from cli import app

    result = cli_runner.invoke(app, ["report", str(FIXTURES[0])])
    assert result.exit_code == 0 and "# dit-bench report" in result.stdout
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = cli_runner.invoke(app, ["report", str(FIXTURES[0]), "--github-summary"])
    assert result.exit_code == 0 and "# dit-bench report" in summary.read_text()


def test_dit_bench_report_from_a_shell(tmp_path):
    out = tmp_path / "r.md"
    run = subprocess.run([sys.executable, "-m", "cli", "report", *map(str, FIXTURES), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.exists() and "reproduced" in run.stderr
    missing = subprocess.run([sys.executable, "-m", "cli", "report", str(tmp_path / "nope.json")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope.json: no such result file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_lint_references(cli_runner, tmp_path):
    from cli import app

    result = cli_runner.invoke(app, ["lint-references"])
    assert result.exit_code == 0 and "copied-baseline" in result.stdout and "meet the schema" in result.stdout
    assert cli_runner.invoke(app, ["lint-references", "--strict"]).exit_code == 1
    broken = cli_runner.invoke(app, ["lint-references", "--dir", str(tmp_path)])
    assert broken.exit_code != 0 and "schema missing" in str(broken.exception)
