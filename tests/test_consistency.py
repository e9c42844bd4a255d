"""The reference lint finds the seeds' known inconsistencies, and nothing where the numbers agree."""
from pathlib import Path

import pytest

import bench
from bench import consistency, reference

REF_DIR = Path(bench.__file__).resolve().parent.parent / "reference_results"


@pytest.fixture(scope="module")
def findings():
    return consistency.lint(reference.load_all(REF_DIR))


def of(findings, check):
    return [f for f in findings if f.check == check]


def test_fasterdiffusion_baseline_is_the_dit_papers_jax_row(findings):
    copied = of(findings, "copied-baseline")
    at256 = [f for f in copied if "fasterdiffusion-readme:table-dit-256-fid" in f.uids]
    assert len(at256) == 1
    assert {"dit-paper:xl2-256-cfg1.5-fid", "dit-paper:xl2-256-cfg1.5-sfid", "dit-paper:xl2-256-cfg1.5-is",
            "dit-paper:xl2-256-cfg1.5-precision", "dit-paper:xl2-256-cfg1.5-recall"} <= set(at256[0].uids)
    assert "framework: jax vs pytorch" in at256[0].message
    assert any("table-dit-512-fid" in u for f in copied for u in f.uids)
    # the DiT README restating its own paper is not a copied *baseline*; the re-measured DiT run differs
    assert not any(u.startswith("dit-readme:") or "eval-dit" in u for f in copied for u in f.uids)


def test_fasterdiffusion_speed_and_fid_use_different_key_steps(findings):
    mismatch = [f for f in of(findings, "key-steps-mismatch") if "table-fd-256-fid" in " ".join(f.uids)]
    assert len(mismatch) == 1
    assert "fasterdiffusion-readme:table-fd-256-s-per-image" in mismatch[0].uids
    assert "speed-rule (ideal 1.544x)" in mismatch[0].message and "fid-list (ideal 1.239x)" in mismatch[0].message


def test_three_published_speedups_for_one_configuration(findings):
    fd = [f for f in of(findings, "multiple-speedups") if f.message.startswith("3 published places")]
    assert len(fd) == 1
    message = fd[0].message
    for value in ("1.574x", "1.553x", "1.545x", "1.530x"):
        assert value in message
    assert "key steps speed-rule" in message and "DiT-XL/2@256" in message
    assert {"fasterdiffusion-readme:table-fd-256-s-per-image", "fasterdiffusion-readme:printed-fd-s-per-image",
            "fasterdiffusion-readme:tqdm-fd-run1", "fasterdiffusion-readme:tqdm-fd-run2"} <= set(fd[0].uids)
    # 512 px has a single published ratio: nothing to disagree with
    assert not any("512" in u for f in of(findings, "multiple-speedups") for u in f.uids)


def test_fast_dit_readme_is_faster_than_its_own_logs(findings):
    above = {f.uids[:2]: f for f in of(findings, "summary-above-logs")}
    assert set(above) == {("fast-dit-readme:amp-steps-per-s", "fast-dit-logs:a100-amp"),
                          ("fast-dit-readme:all-steps-per-s", "fast-dit-logs:a100-all")}
    amp = above[("fast-dit-readme:amp-steps-per-s", "fast-dit-logs:a100-amp")]
    assert "+8%" in amp.message and "train_feature.out" in amp.message  # 0.56 is the features-only log
    assert "fast-dit-logs:a100-feature" in amp.uids
    assert "0.74-0.75 (+12%" in above[("fast-dit-readme:all-steps-per-s", "fast-dit-logs:a100-all")].message
    # 0.43 (README) vs 0.42 (log) is within the rounding of two printed digits: not a finding


def test_edt_xl_published_size_is_not_its_released_configuration(findings):
    sizes = of(findings, "size-vs-release")
    assert {f.uids for f in sizes} == {("edt-code:xl2-comment-trainable-params", "edt-code:xl2-trainable-params"),
                                       ("edt-readme:xl2-gmacs", "edt-code:xl2-gmacs")}
    gmacs = [f for f in sizes if "gmacs" in f.message][0]
    assert "51.83" in gmacs.message and "53.44" in gmacs.message and "-3.0%" in gmacs.message
    # EDT-S/B (truncated digits), U-DiT (eval-mode MACs), DiT ("119" Gflops = 118.62 GMACs) all agree


def test_claimed_speedups_above_the_flop_bound(findings):
    bound = {f.uids[0]: f for f in of(findings, "above-flop-bound")}
    table = bound["fasterdiffusion-readme:table-fd-256-s-per-image"]
    assert table.severity == consistency.WARNING and "1.9% above the ideal FLOP bound 1.5439x" in table.message
    assert bound["fasterdiffusion-readme:printed-fd-s-per-image"].severity == consistency.INFO  # 0.6%, within 1%
    assert "fasterdiffusion-readme:tqdm-fd-run1" not in bound           # 1.530 < 1.544
    assert "fasterdiffusion-readme:table-fd-512-s-per-image" not in bound  # 1.513 < 1.544


def test_every_check_reports_something_on_the_seeds(findings):
    assert {f.check for f in findings} == set(consistency.CHECKS)
    assert all(f.message and f.uids and "\n" not in f.message for f in findings)


# ---- the checks read data, not row ids ------------------------------------------------------------

TOY = """
source: {{id: toy, title: Toy, kind: readme, repository: a/b, commit: abcdef0}}
defaults: {{method: fasterdiffusion, model: DiT-XL/2, resolution: 256, kind: speed, role: result, unit: s,
           metric: s_per_image, provenance: {{file: README.md, table: T}}}}
rows:
  - {{id: base, method: dit, role: baseline, value: 5.00, protocol: {{key_steps: all}}}}
  - {{id: fast, value: {fast}, baseline: base, protocol: {{key_steps: speed-rule}}}}
  - {{id: bound, role: bound, resolution: null, metric: speedup, unit: x, value: 1.5439,
     versus: {{method: dit, model: DiT-XL/2}}, protocol: {{key_steps: speed-rule}},
     derivation: {{steps: 250, full_steps: 113, partial_steps: 137, blocks: 28, partial_blocks: 10}}}}
"""


@pytest.mark.parametrize("fast, severity", [(3.40, None), (3.22, consistency.INFO), (3.00, consistency.WARNING)])
def test_the_bound_check_is_generic(tmp_path, fast, severity):
    (tmp_path / "schema.yaml").write_text((REF_DIR / "schema.yaml").read_text())
    (tmp_path / "toy.yaml").write_text(TOY.format(fast=f"{fast:.2f}"))
    found = consistency.lint(reference.load_all(tmp_path))
    assert [f.severity for f in found] == ([severity] if severity else [])
    if severity:
        assert f"{100 * (5.0 / fast / 1.5439 - 1):.1f}% above" in found[0].message
