"""reference_results/: every file meets the schema, and the published numbers read back exactly."""
from pathlib import Path

import jsonschema
import pytest
import yaml

import bench
from bench import reference
from bench.reference import ReferenceError

REF_DIR = Path(bench.__file__).resolve().parent.parent / "reference_results"
FILES = sorted(p for p in REF_DIR.glob("*.yaml") if p.name != "schema.yaml")


@pytest.fixture(scope="module")
def refs():
    return reference.load_all(REF_DIR)


def _schema():
    return yaml.safe_load((REF_DIR / "schema.yaml").read_text())


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(_schema())


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_file_meets_the_schema(path):
    jsonschema.Draft202012Validator(_schema()).validate(yaml.safe_load(path.read_text()))
    source, rows = reference.load_source(path, reference._schema(str(REF_DIR)))
    assert rows and all(r["source"] == source["id"] for r in rows)


def test_the_seeds_are_all_there(refs):
    assert {"dit-paper", "dit-readme", "fast-dit-readme", "fast-dit-logs", "fasterdiffusion-readme",
            "fasterdiffusion-paper", "speedit-readme", "edt-readme", "udit-model-card"} <= set(refs.sources)
    assert {norm for norm in (reference.norm(r["method"]) for r in refs.rows)} >= {
        "dit", "fastdit", "fasterdiffusion", "speedit", "edt", "udit"}


def test_every_row_names_its_unit_and_macs_are_never_flops(refs):
    for row in refs.rows:
        assert row["unit"] == reference.UNITS[row["metric"]], row["uid"]
        if (row.get("published_as") or "").lower() in ("gflops", "gflops (macs)"):
            # the DiT/EDT/U-DiT papers print MAC counts under the name "Gflops"
            assert row["metric"] == "gmacs" and row["unit"] == "GMAC", row["uid"]


def test_every_row_has_provenance_and_a_full_protocol_vocabulary(refs):
    for row in refs.rows:
        src = refs.sources[row["source"]]
        cite = reference.citation(refs, row)
        if src["kind"] == "paper":
            assert src["version"] and row["provenance"].get("table"), row["uid"]
        elif src["kind"] != "model-card":
            commit = row["provenance"].get("commit", src["commit"])
            assert commit is None and row["provenance"].get("locator") or commit[:7] in cite, row["uid"]
        assert set(row["protocol"]) <= set(reference.PROTOCOL_KEYS)
        assert set(row["irrelevant"]) <= set(reference.PROTOCOL_KEYS)


# ---- published values by exact lookup --------------------------------------------------------------

def test_dit_xl2_256(refs):
    kw = dict(source="dit-paper", model="DiT-XL/2", resolution=256, cfg_scale=1.5)
    assert refs.value(metric="fid", **kw) == 2.27
    assert refs.value(metric="inception_score", **kw) == 278.24
    assert refs.find(metric="fid", **kw)[0]["protocol"]["framework"] == "jax"  # DiT README: sampled in JAX


def test_fasterdiffusion_fid_and_time_share_one_table_row(refs):
    table = [r for r in refs.find(source="fasterdiffusion-readme", method="fasterdiffusion", resolution=256)
             if r["provenance"]["table"] == "Performance"]
    by_metric = {r["metric"]: r for r in table}
    assert by_metric["fid"]["value"] == 2.31
    assert by_metric["s_per_image"]["value"] == 3.26
    assert refs.row(by_metric["s_per_image"]["baseline"])["value"] == 5.13


def test_fast_dit_all_tricks(refs):
    hooks = ["grad-ckpt", "amp-fp16", "features"]
    assert refs.value(source="fast-dit-readme", hooks=hooks, metric="steps_per_s") == 0.84
    assert refs.value(source="fast-dit-readme", hooks=hooks, metric="peak_memory_mb") == 27485
    assert refs.value(source="fast-dit-logs", hooks=hooks, metric="steps_per_s", num_gpus=1) == 0.75


def test_edt_s2_and_udit_b(refs):
    assert refs.value(source="edt-readme", model="EDT-S/2", metric="gmacs") == 2.66
    assert refs.value(source="edt-readme", model="EDT-S/2", metric="fid") == 34.27
    assert refs.value(source="udit-model-card", model="U-DiT-B", metric="gmacs") == 22.22


def test_ambiguous_lookup_names_the_candidates(refs):
    with pytest.raises(ReferenceError, match="2 reference rows match.*table-fd-256-fid.*eval-fd-fid"):
        refs.value(source="fasterdiffusion-readme", method="fasterdiffusion", resolution=256, metric="fid")


def test_quantum_is_read_from_the_published_text(refs):
    assert refs.row("edt-readme:b2-gmacs")["quantum"] == pytest.approx(0.01)       # "10.20", not 10.2
    assert refs.row("udit-model-card:l-gmacs")["quantum"] == pytest.approx(0.01)   # "85.00"
    assert refs.row("dit-readme:xl2-256-gmacs")["quantum"] == 1                    # "119"
    assert refs.row("edt-code:xl2-comment-trainable-params")["quantum"] == 10000   # "708.44M"


def test_derived_speedups_and_their_rounding_intervals(refs):
    claims = {c["uid"]: c for c in reference.ratio_claims(refs)}
    table = claims["fasterdiffusion-readme:table-fd-256-s-per-image"]
    assert table["value"] == pytest.approx(5.13 / 3.26)
    assert table["interval"] == pytest.approx((5.125 / 3.265, 5.135 / 3.255))
    tqdm = claims["fasterdiffusion-readme:tqdm-fd-run1"]  # it/s is a rate: method over baseline
    assert tqdm["value"] == pytest.approx(9.32 / 6.09)
    assert claims["fast-dit-logs:a100-all"]["interval"][1] == pytest.approx(0.755 / 0.415)  # printed range 0.74-0.75


# ---- broken files are refused with one line naming file and field -----------------------------------

GOOD = """
source: {id: toy, title: Toy paper, kind: paper, paper: "arXiv:0000.00000", version: v1}
defaults: {method: dit, model: DiT-XL/2, resolution: 256, kind: quality, role: result, unit: ""}
rows:
  - {id: fid, metric: fid, value: 2.5, protocol: {cfg_scale: 1.5}, provenance: {table: Table 1}}
  - {id: fd-fid, method: fasterdiffusion, metric: fid, value: 2.6, baseline: fid, protocol: {cfg_scale: 1.5},
     provenance: {table: Table 1}}
"""


def _folder(tmp_path, text):
    (tmp_path / "schema.yaml").write_text((REF_DIR / "schema.yaml").read_text())
    (tmp_path / "toy.yaml").write_text(text)
    return tmp_path


def test_a_minimal_file_loads(tmp_path):
    refs = reference.load_all(_folder(tmp_path, GOOD))
    assert refs.row("toy:fd-fid")["baseline"] == "toy:fid"
    assert "gpu" in refs.row("toy:fid")["irrelevant"]  # FID does not depend on the GPU


@pytest.mark.parametrize("old,new,message", [
    ('unit: ""}', "unit: GMAC}", r"unit 'GMAC' is wrong for fid"),
    ("provenance: {table: Table 1}}\n  - {id: fd-fid", "provenance: {}}\n  - {id: fd-fid",
     "row fid: .*provenance needs at least one of table, file or locator"),
    ("protocol: {cfg_scale: 1.5}, provenance: {table: Table 1}}\n  - {id: fd",
     "protocol: {guidance: 1.5}, provenance: {table: Table 1}}\n  - {id: fd", r"rows/0/protocol: .*'guidance' was unexpected"),
    ("id: fd-fid", "id: fid", "duplicate id"),
    ("baseline: fid", "baseline: nope", "baseline 'nope' names no row"),
    ("version: v1}", "}", "version"),
    ("value: 2.5", "value: null", "outcome"),
    ("metric: fid, value: 2.5", "metric: fidd, value: 2.5", "fidd"),
])
def test_a_broken_file_is_refused(tmp_path, old, new, message):
    assert old in GOOD
    with pytest.raises(ReferenceError, match=message) as err:
        reference.load_all(_folder(tmp_path, GOOD.replace(old, new, 1)))
    assert "toy.yaml" in str(err.value) and "\n" not in str(err.value)


def test_a_bound_must_equal_its_derivation(tmp_path):
    text = GOOD + """  - {id: bound, method: fasterdiffusion, metric: speedup, unit: x, kind: speed, role: bound, value: 1.6,
     protocol: {key_steps: speed-rule}, provenance: {table: T},
     derivation: {steps: 250, full_steps: 113, partial_steps: 137, blocks: 28, partial_blocks: 10}}
"""
    with pytest.raises(ReferenceError, match=r"bound 1.6 does not equal its derivation \(1.54389\)"):
        reference.load_all(_folder(tmp_path, text))
    reference.load_all(_folder(tmp_path, text.replace("value: 1.6", "value: 1.5439")))


def test_the_folder_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.setenv(reference.ENV_DIR, str(_folder(tmp_path, GOOD)))
    assert reference.reference_dir() == tmp_path
    assert set(reference.load_all().sources) == {"toy"}
    monkeypatch.setenv(reference.ENV_DIR, str(tmp_path / "missing"))
    with pytest.raises(ReferenceError, match="is not a directory"):
        reference.reference_dir()


def test_the_default_folder_is_the_one_beside_the_package(monkeypatch):
    monkeypatch.delenv(reference.ENV_DIR, raising=False)
    assert reference.reference_dir() == REF_DIR


def test_an_installed_wheel_finds_its_data_files_copy(tmp_path, monkeypatch):
    # a wheel installs reference_results/ as data files under <prefix>/share/dit-bench/ (pyproject data-files)
    monkeypatch.delenv(reference.ENV_DIR, raising=False)
    monkeypatch.setattr(reference.bench, "__file__", str(tmp_path / "site-packages" / "bench" / "__init__.py"))
    shared = tmp_path / "prefix" / "share" / "dit-bench" / "reference_results"
    shared.mkdir(parents=True)
    _folder(shared, GOOD)
    monkeypatch.setattr(reference.sysconfig, "get_paths", lambda: {"data": str(tmp_path / "prefix")})
    assert reference.reference_dir() == shared
    shared.joinpath("schema.yaml").unlink()
    monkeypatch.setattr(reference.site, "USER_BASE", str(tmp_path / "nowhere"))
    with pytest.raises(ReferenceError, match="reference_results/ not found"):
        reference.reference_dir()
