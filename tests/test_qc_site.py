"""A site's own flag line (lungsam.qc_site, ``lungsam qc-site``, ``lungsam predict --qc-site``, the node's
``model.qc_site``): the cut on hand-made scores, the file's validation, and the end-to-end path on a real bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lungsam.qc import QcModel
from lungsam.qc_site import (
    DEFAULT_MIN_IMAGES,
    FORMAT,
    SiteOperatingPoint,
    SiteQcError,
    choose_line,
    read_site_file,
    site_operating_point,
    site_quality_model,
    write_site_file,
)

DIGEST = "ab" * 32


def _op(**kw) -> SiteOperatingPoint:
    scores = np.linspace(0.01, 0.99, 100)
    base = dict(bundle_digest=DIGEST, bundle_flag_below=0.5, source={"predict_run": "x"})
    base.update(kw)
    return site_operating_point(scores, 0.10, **base)


def _model(flag_below: float = 0.5) -> QcModel:
    return QcModel(features=("pred_iou",), mean={"pred_iou": 0.9}, std={"pred_iou": 0.05}, weights={"pred_iou": 1.0},
                   bias=0.0, flag_below=flag_below, center={"pred_iou": 0.9})


def test_line_flags_the_asked_share_exactly():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 237)
    for share in (0.05, 0.10, 0.25, 0.5):
        line = choose_line(scores, share)
        assert int(np.sum(scores < line)) == int(np.floor(share * len(scores)))
        assert 0 < line < 1


def test_line_with_ties_at_the_cut_flags_fewer_and_the_count_is_recorded():
    scores = [0.2] * 20 + [0.6] * 40  # the cut at 10 % (6 images) falls inside the tie at 0.2
    assert choose_line(scores, 0.10, min_images=10) == pytest.approx(0.2)
    op = site_operating_point(scores, 0.10, bundle_digest=DIGEST, bundle_flag_below=0.5, source={}, min_images=10)
    assert op.flagged == 0 and op.bundle_flagged == 20


@pytest.mark.parametrize("scores,share,words", [
    ([0.5] * 10, 0.1, "at least 50"),
    (list(np.linspace(0, 1, 60)), 1.0, "in (0, 1)"),
    (list(np.linspace(0, 1, 60)), 0.01, "flags none"),
    ([0.0] * 30 + [0.5] * 30, 0.2, "must lie in (0, 1)"),
    ([float("nan")] * 60, 0.1, "finite"),
])
def test_line_refuses_what_cannot_make_a_line(scores, share, words):
    with pytest.raises(SiteQcError, match=words.replace("(", r"\(").replace(")", r"\)")):
        choose_line(scores, share)


def test_site_file_round_trip_is_strict_json(tmp_path):
    op = _op()
    assert op.flagged == 10 and op.n == 100 and op.bundle_flagged == 50
    assert set(op.score_quantiles) == {"p05", "p10", "p25", "p50", "p75", "p90", "p95"}
    path = tmp_path / "site.json"
    write_site_file(path, op)
    text = path.read_text()
    assert json.loads(text)["format"] == FORMAT and "NaN" not in text
    back, digest = read_site_file(path)
    assert back == op and len(digest) == 64


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.update(format="lungsam-qc-site/0"), "format"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.pop("flag_below"), "missing key"),
    (lambda d: d.update(flag_below=1.5), "flag_below"),
    (lambda d: d.update(bundle_digest="XYZ"), "bundle_digest"),
    (lambda d: d.update(flagged=1000), "exceed"),
    (lambda d: d["score_quantiles"].pop("p50"), "score_quantiles"),
])
def test_site_file_refuses_a_tampered_or_foreign_file(tmp_path, edit, words):
    d = _op().to_dict()
    edit(d)
    path = tmp_path / "site.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SiteQcError, match=words):
        read_site_file(path)


def test_site_file_refuses_non_standard_json(tmp_path):
    path = tmp_path / "site.json"
    path.write_text(json.dumps(_op().to_dict()).replace('"flag_below": 0.', '"flag_below": NaN, "x": 0.'))
    with pytest.raises(SiteQcError, match="site.json"):
        read_site_file(path)


def test_site_line_moves_only_the_flag_and_only_for_its_bundle():
    model = _model(0.5)
    op = _op()
    site = site_quality_model(model, op, DIGEST)
    assert site.flag_below == op.flag_below and site.weights == model.weights and "site line" in site.source
    features = {"pred_iou": 0.9}
    assert site.assess(features).score == model.assess(features).score
    with pytest.raises(SiteQcError, match="made for bundle abababab"):
        site_quality_model(model, op, "cd" * 32)
    with pytest.raises(SiteQcError, match="no quality model"):
        site_quality_model(None, op, DIGEST)
    with pytest.raises(SiteQcError, match="version 1"):
        site_quality_model(object(), op, DIGEST)


def test_cli_default_min_images_is_the_library_default():
    from lungsam.runtime.commands import SITE_MIN_IMAGES

    assert SITE_MIN_IMAGES == DEFAULT_MIN_IMAGES


def test_qc_site_end_to_end_on_a_bundle(tiny_bundle, tmp_path):
    """predict a batch -> qc-site -> predict with the site line: the share flagged on that batch is the share
    asked for, every score is unchanged, predict.json records the line; another bundle's file is refused."""
    from lungsam.cli import main
    from lungsam.runtime.predict import read_finished_run

    demo = Path(__file__).resolve().parents[1] / "lungsam" / "demo_data" / "montgomery" / "images"
    runner = CliRunner()
    first = tmp_path / "first"
    r = runner.invoke(main, ["predict", str(tiny_bundle), str(demo), "--out", str(first), "-q"])
    assert r.exit_code == 0, r.output
    site = tmp_path / "site.json"
    r = runner.invoke(main, ["qc-site", str(tiny_bundle), str(first), "--flag-share", "0.25", "--min-images", "16",
                             "--out", str(site)])
    assert r.exit_code == 0, r.output
    op, digest = read_site_file(site)
    scores = [rec["qc"]["score"] for rec in read_finished_run(first).ok]
    assert op.n == 16 and op.flagged == int(np.sum(np.array(scores) < op.flag_below)) == 4  # floor(0.25 x 16)
    assert len(set(scores)) > 8  # real, varied scores (not a degenerate model)
    assert op.source["predictions_sha256"] == read_finished_run(first).predictions_sha256

    again = tmp_path / "again"
    r = runner.invoke(main, ["predict", str(tiny_bundle), str(demo), "--out", str(again), "--qc-site", str(site), "-q"])
    assert r.exit_code == 0, r.output
    run = read_finished_run(again)
    assert [x["qc"]["score"] for x in run.ok] == scores
    assert [x["qc"]["flag"] for x in run.ok] == [s < op.flag_below or s == 0 for s in scores]
    point = run.record["segmenter"]["qc_operating_point"]
    assert point["source"] == "site" and point["flag_below"] == op.flag_below and point["sha256"] == digest
    assert read_finished_run(first).record["segmenter"]["qc_operating_point"]["source"] == "bundle"
    from lungsam.node.config import ModelConfig
    from lungsam.node.service import load_segmenter

    node_seg = load_segmenter(ModelConfig(bundle=Path(tiny_bundle), qc_site=site))  # the node's [model] qc_site
    assert node_seg.qc.flag_below == op.flag_below

    # refused: the same file after the digest it binds to changed, an existing --out, an unfinished run
    d = json.loads(site.read_text())
    d["bundle_digest"] = "cd" * 32
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    r = runner.invoke(main, ["predict", str(tiny_bundle), str(demo), "--out", str(tmp_path / "x"), "--qc-site",
                             str(other)])
    assert r.exit_code == 1 and "made for bundle cdcdcdcd" in r.output
    r = runner.invoke(main, ["qc-site", str(tiny_bundle), str(first), "--min-images", "16", "--out", str(site)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    record = json.loads((first / "predict.json").read_text())
    record["status"] = "incomplete"
    (first / "predict.json").write_text(json.dumps(record))
    r = runner.invoke(main, ["qc-site", str(tiny_bundle), str(first), "--min-images", "16", "--out",
                             str(tmp_path / "y.json")])
    assert r.exit_code == 1 and "did not finish" in r.output
