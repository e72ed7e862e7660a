"""The quality flag: signals on hand-made probability maps, calibration, detection figures, and the fields
a tiny run, its bundle and the runtime carry."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lungsam.qc import (
    FEATURES,
    IMAGE_FEATURES,
    JITTER,
    SHAPE_FEATURES,
    JitterTerm,
    QcCalibration,
    QcError,
    QcModel,
    ShapeModel,
    auroc,
    calibrate,
    detection_summary,
    load_calibration,
    qc_features,
)
from lungsam.qc_fit import degraded_copies, fit_quality_model

S = 64


def lungs(dy: int = 0, dx: int = 0, size: int = S) -> np.ndarray:
    """A plausible probability map: two lung-shaped rectangles (p 0.97) with a soft one-pixel border."""
    p = np.full((size, size), 0.02, np.float32)
    p[12 + dy:52 + dy, 8 + dx:28 + dx] = 0.97
    p[12 + dy:52 + dy, 36 + dx:56 + dx] = 0.97
    return p


def good_calibration() -> QcCalibration:
    feats = [qc_features(lungs(dy, dx), 0.5, 0.95 + 0.005 * dy) for dy in (-2, -1, 0, 1, 2) for dx in (-1, 0, 1)]
    return calibrate(feats)


def test_features_of_hand_made_maps():
    f = qc_features(lungs(), 0.5, 0.96)
    assert set(f) == set(FEATURES)
    assert qc_features(lungs(), 0.5, 0.96, second=lungs(0, 3))["two_pass_iou"] < 1.0
    assert f["components"] == 2 and f["stray_fraction"] == 0 and f["hole_fraction"] == 0
    assert f["balance"] == pytest.approx(1.0) and f["area_fraction"] == pytest.approx(1600 / S**2)
    blank = np.full((S, S), 0.95, np.float32)  # a blank image came back as 97 % lung
    assert qc_features(blank, 0.5, 0.97)["area_fraction"] == 1.0
    one = lungs()
    one[:, 32:] = 0.02  # one lung missing
    assert qc_features(one, 0.5, 0.9)["balance"] == 0.0
    specks = lungs()
    specks[2:4, 2:4] = specks[60:62, 30:32] = 0.9
    fs = qc_features(specks, 0.5, 0.9)
    assert fs["components"] == 4 and fs["stray_fraction"] > 0
    holed = lungs()
    holed[25:35, 12:24] = 0.3  # an opacified region the mask leaves out
    assert qc_features(holed, 0.5, 0.9)["hole_fraction"] > 0.05
    soft = np.where(lungs() > 0.5, 0.6, 0.3).astype(np.float32)
    assert qc_features(soft, 0.5, 0.9)["uncertain_fraction"] > 1.0


def test_calibrated_flag_marks_implausible_masks_only():
    cal = good_calibration()
    ok = cal.assess(qc_features(lungs(1, 0), 0.5, 0.955))
    assert not ok.flag and ok.score > 0.5 and ok.reasons == []
    blank = cal.assess(qc_features(np.full((S, S), 0.95, np.float32), 0.5, 0.97))
    assert blank.flag and blank.score < 0.5 and any(r.startswith("area_fraction") for r in blank.reasons)
    one = lungs()
    one[:, 32:] = 0.02
    r = cal.assess(qc_features(one, 0.5, 0.95))
    assert r.flag and any(x.startswith("balance") for x in r.reasons)
    empty = cal.assess(qc_features(np.zeros((S, S), np.float32), 0.5, 0.5))
    assert empty.flag and empty.score == 0.0 and empty.reasons[0] == "empty mask"
    d = blank.to_dict()
    assert set(d) == {"score", "flag", "reasons"} and 0.0 <= d["score"] <= 1.0
    json.dumps(blank.to_dict(details=True), allow_nan=False)


def test_calibration_round_trip_and_validation():
    cal = good_calibration()
    d = cal.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d and d["format"] == "lungsam-qc/1" and d["n"] == 15
    back = QcCalibration.from_dict(d)
    assert back == cal and QcCalibration.from_dict(None) is None
    with pytest.raises(QcError, match="format"):
        QcCalibration.from_dict({**d, "format": "x"})
    with pytest.raises(QcError, match="unknown key"):
        QcCalibration.from_dict({**d, "extra": 1})
    with pytest.raises(QcError, match="scale"):
        QcCalibration.from_dict({**d, "scale": {**d["scale"], "balance": 0.0}})
    with pytest.raises(QcError, match="bad_side"):
        QcCalibration.from_dict({**d, "bad_side": {**d["bad_side"], "balance": "high"}})
    with pytest.raises(QcError, match="unknown signal"):
        QcCalibration.from_dict({**d, "features": ["nope"]})
    with pytest.raises(ValueError, match="at least 3"):
        calibrate([qc_features(lungs(), 0.5, 0.9)])


def test_auroc_and_detection_summary():
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5, 0.5], [True, True]) is None
    cal = good_calibration()
    results = [cal.assess(qc_features(lungs(), 0.5, 0.95)),
               cal.assess(qc_features(np.full((S, S), 0.95, np.float32), 0.5, 0.97))]
    s = detection_summary(results, [0.97, 0.40])
    assert s["bad"] == 1 and s["bad_caught"] == 1 and s["flagged"] == 1 and s["auroc"] == 1.0
    assert s["flagged_share"] == 0.5 and s["bad_caught_share"] == 1.0
    json.dumps(detection_summary(results, [0.95, 0.95]), allow_nan=False)  # no bad mask: None, not NaN


# ---- version 2: shape model, image signals, the fitted logistic model -------------------------------------------

def radiograph(mask: np.ndarray) -> np.ndarray:
    """A hand-made chest image ``(S, S, 3)`` uint8: dark lungs where ``mask`` is, a bright body elsewhere."""
    g = np.where(mask, 50, 200).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def fitted_model() -> QcModel:
    """A model fitted on 9 hand-made validation maps (their masks and images), shape model from 15 training masks."""
    val = [lungs(dy, dx) for dy in (-2, 0, 2) for dx in (-1, 0, 1)]
    gt = [p > 0.5 for p in val]
    train = [lungs(dy, dx) > 0.5 for dy in (-3, -2, -1, 0, 1, 2, 3) for dx in (-1, 1)] + [lungs() > 0.5]
    return fit_quality_model(np.stack(val), np.full(len(val), 0.95), gt, train, 0.5, None, "hand-made",
                             images=[radiograph(m) for m in gt])


def test_shape_model_and_image_signals_of_hand_made_masks():
    train = [lungs(dy, dx) > 0.5 for dy in (-3, -1, 0, 1, 3) for dx in (-2, 0, 2)]
    shape = ShapeModel.fit(train, size=16, k=4)
    one = lungs() > 0.5
    one[:, 32:] = False  # a lung missing: far from every training shape
    assert shape.signals(one)["shape_residual"] > 2 * shape.signals(lungs() > 0.5)["shape_residual"]
    assert ShapeModel.from_dict(shape.to_dict()).signals(one) == pytest.approx(shape.signals(one), abs=1e-4)
    with pytest.raises(QcError, match="qc.shape"):
        ShapeModel.from_dict({**shape.to_dict(), "variances": [0.0] * 4})
    from lungsam.qc import image_signals

    full = lungs() > 0.5
    img = radiograph(full)
    short = full.copy()
    short[40:] = False  # stops short of the bases: lung (dark) just outside its lower edge
    assert image_signals(img, full)["edge_contrast"] > 0.3
    assert image_signals(img, short)["edge_contrast_min"] < image_signals(img, full)["edge_contrast_min"] - 0.3


def test_degraded_copies_are_deterministic_and_degrade():
    a, b = degraded_copies(lungs(), 0.5), degraded_copies(lungs(), 0.5)
    assert [n for n, _ in a] == [n for n, _ in b] and all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    dropped = dict(a)["drop_one_lung"] > 0.5
    assert dropped[:, :32].any() and not dropped[:, 32:].any()


def test_fitted_model_flags_a_degraded_mask_with_its_reason_and_round_trips():
    model = fitted_model()
    assert model.n == 9 and model.n_degraded > 0 and model.fit["bad_examples"] > 0
    for f in FEATURES + SHAPE_FEATURES + IMAGE_FEATURES:  # a signal can only lower the score on its bad side
        assert model.weights[f] * (1 if f in ("pred_iou", "balance", "mean_probability") + IMAGE_FEATURES else -1) >= 0
    good = lungs(1, 0)
    ok = model.assess_map(good, 0.5, 0.95, image=radiograph(good > 0.5))
    one = lungs()
    one[:, 32:] = 0.02  # the right half lost
    bad = model.assess_map(one, 0.5, 0.95, image=radiograph(lungs() > 0.5))
    assert not ok.flag and ok.score > bad.score and bad.flag
    assert bad.reasons and bad.reasons[0].split(" ")[0] in ("balance", "shape_residual", "area_fraction")
    empty = model.assess_map(np.zeros((S, S), np.float32), 0.5, 0.5, image=radiograph(lungs() > 0.5))
    assert empty.flag and empty.score == 0.0 and empty.reasons[0] == "empty mask"
    d = model.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = load_calibration(json.loads(text))
    assert isinstance(back, QcModel) and back.assess_map(one, 0.5, 0.95, image=radiograph(lungs() > 0.5)).score == \
        pytest.approx(bad.score, abs=1e-4)
    json.dumps(bad.to_dict(details=True), allow_nan=False)
    with pytest.raises(QcError, match="image"):
        model.assess_map(good, 0.5, 0.95)  # the image signals need the image
    with pytest.raises(QcError, match="unknown key"):
        load_calibration({**d, "extra": 1})
    with pytest.raises(QcError, match="flag_below"):
        load_calibration({**d, "flag_below": 1.5})
    with pytest.raises(QcError, match="soft_band"):
        load_calibration({**d, "soft_band": [0.1, 0.9]})
    with pytest.raises(QcError, match="finite"):
        load_calibration({**d, "weights": {**d["weights"], "balance": None}})
    assert isinstance(load_calibration(good_calibration().to_dict()), QcCalibration)  # older runs and bundles


def test_jitter_prompts_move_every_point_and_drop_each_in_turn():
    from lungsam.errors import ArgumentError
    from lungsam.prompts import LearnedPrompt, default_jitter_names, jitter_prompts

    pts = np.asarray([[0.3, 0.3], [0.3, 0.5], [0.01, 0.7], [0.7, 0.3], [0.7, 0.5], [0.7, 0.7]], np.float32)
    p = LearnedPrompt("points", pts, np.ones(6, np.int32), None, 3)
    v = jitter_prompts(p, 0.03)
    assert list(v) == ["up", "down", "left", "right"] + [f"drop{i}" for i in range(6)]
    np.testing.assert_allclose(v["up"].points[:, 1], pts[:, 1] - 0.03, atol=1e-6)
    np.testing.assert_allclose(v["right"].points[:, 0], pts[:, 0] + 0.03, atol=1e-6)
    assert v["left"].points[2, 0] == 0.0  # clipped to the frame
    assert len(v["drop2"].points) == 5 and not (v["drop2"].points == pts[2]).all(axis=1).any()
    assert list(jitter_prompts(LearnedPrompt("points", pts[[0, 3]], np.ones(2, np.int32), None, 1), 0.03)) == \
        ["up", "down", "left", "right"]  # one point per lung: nothing to drop
    assert default_jitter_names(p) == tuple(v)  # what the flag runs by default: all ten
    with pytest.raises(ArgumentError, match="learned points"):
        jitter_prompts(LearnedPrompt("auto-box", None, None, np.zeros(4, np.float32), 3), 0.03)
    with pytest.raises(ArgumentError, match="shift"):
        jitter_prompts(p, 0.5)


def test_jitter_inputs_are_the_model_frame_variants_in_the_calibrated_order():
    """One definition of what the flag's variant decodes are fed: the runtime and the export's parity gate
    (ONNX point form) and torch (model frame) read the same prompts, in the calibration's order."""
    from lungsam.backbones import get_backbone
    from lungsam.errors import ArgumentError
    from lungsam.prompts import (
        LearnedPrompt,
        jitter_model_prompts,
        jitter_point_inputs,
        jitter_prompts,
        labelled_points,
        model_prompt,
        point_count_groups,
    )

    spec = get_backbone("lite_medsam").preprocess
    pts = np.asarray([[0.3, 0.3], [0.3, 0.5], [0.3, 0.7], [0.7, 0.3], [0.7, 0.5], [0.7, 0.7]], np.float32)
    p = LearnedPrompt("points", pts, np.ones(6, np.int32), None, 3)
    names = ("drop4", "up", "left")
    onnx, model = jitter_point_inputs(p, spec, 256, 0.03, names), jitter_model_prompts(p, spec, 256, 0.03, names)
    v = jitter_prompts(p, 0.03)
    for (c, lab), m, n in zip(onnx, model, names):
        ref = labelled_points(*model_prompt(v[n], spec, (256, 256)))
        np.testing.assert_array_equal(c, ref[0])
        np.testing.assert_array_equal(lab, ref[1])
        assert m[2] is None and len(m[0]) == len(c) - 1 and lab[-1] == -1  # one padding point, as SAM adds it
    assert [len(c) for c, _ in onnx] == [6, 7, 7]  # a dropped point: one prompt point fewer
    # the runtime's decoder and the parity gate's timing both decode equal point counts together
    assert point_count_groups([*onnx, None]) == {6: [0], 7: [1, 2], None: [3]}
    np.testing.assert_allclose(model[1][0][:, 1], model_prompt(p, spec, (256, 256))[0][:, 1] - 0.03 * spec.img_size,
                               atol=1e-3)  # moved up by 3 % of the frame, in model-frame pixels
    with pytest.raises(ArgumentError, match=r"\['drop9'\] cannot be made"):
        jitter_point_inputs(p, spec, 256, 0.03, ("up", "drop9"))


def test_jitter_term_lowers_the_score_only_below_validation_and_round_trips():
    from dataclasses import replace

    base = fitted_model()
    names = ("up", "down", "left", "right")
    term = JitterTerm.calibrate([0.97, 0.975, 0.98, 0.985, 0.99], 0.03, names)
    assert term.center == pytest.approx(0.98) and term.scale >= 0.005 and term.n == 5
    model = replace(base, jitter=term)
    good, image = lungs(1, 0), radiograph(lungs(1, 0) > 0.5)
    agree = model.assess_map(good, 0.5, 0.95, image=image, variants=[good] * 4)
    assert agree.features[JITTER] == 1.0 and agree.z[JITTER] == 0.0  # better than validation: no bonus, no cost
    assert agree.score == pytest.approx(base.assess_map(good, 0.5, 0.95, image=image).score)
    moved = [lungs(1, 6), lungs(1, -6), lungs(7, 0), lungs(-5, 0)]  # the decoder's mask moves with its prompt
    unsure = model.assess_map(good, 0.5, 0.95, image=image, variants=moved)
    assert unsure.features[JITTER] < 0.9 and unsure.z[JITTER] == pytest.approx(-6.0)  # clipped at Z_CLIP scales
    assert unsure.score < agree.score
    heavy = replace(model, jitter=replace(term, weight=3.0)).assess_map(good, 0.5, 0.95, image=image, variants=moved)
    assert heavy.flag and heavy.reasons[0].startswith(JITTER)  # 18 log-odds: flagged, the jitter named first
    interactive = model.assess_map(good, 0.5, 0.95, image=image)  # no variants: the logistic model alone
    assert JITTER not in interactive.features and interactive.score == pytest.approx(agree.score)
    with pytest.raises(QcError, match="prompt-variant maps"):
        model.assess_map(good, 0.5, 0.95, image=image, variants=[good] * 3)
    d = model.to_dict()
    back = load_calibration(json.loads(json.dumps(d, allow_nan=False)))
    assert back.jitter == term and back.assess_map(good, 0.5, 0.95, image=image, variants=moved).score == \
        pytest.approx(unsure.score, abs=1e-4)  # the shape model is stored rounded
    assert load_calibration(base.to_dict()).jitter is None  # a calibration from before the term
    for bad, match in (({**d["jitter"], "shift": 0.0}, "shift"), ({**d["jitter"], "scale": -1.0}, "scale"),
                       ({**d["jitter"], "signal": "two_pass_iou"}, "signal"), ({**d["jitter"], "x": 1}, "keys"),
                       ({**d["jitter"], "center": float("nan")}, "finite")):
        with pytest.raises(QcError, match=match):
            load_calibration({**d, "jitter": bad})
    with pytest.raises(ValueError, match="at least 3"):
        JitterTerm.calibrate([0.9, 0.95], 0.03, names)


def test_adding_the_jitter_term_keeps_the_validation_flag_budget():
    from lungsam.qc_fit import add_jitter_term

    base = fitted_model()
    val = [lungs(dy, dx) for dy in (-2, 0, 2) for dx in (-1, 0, 1)]
    rows = [{**base.signals(p, 0.5, 0.95, image=radiograph(p > 0.5)), JITTER: j}
            for p, j in zip(val, (0.99, 0.985, 0.98, 0.99, 0.97, 0.975, 0.99, 0.96, 0.93))]
    good = np.ones(len(rows), bool)
    model = add_jitter_term(base, rows, good, 0.03, ("up", "down"), weight=3.0)
    assert model.jitter.n == 9 and model.jitter.center == pytest.approx(0.98) and model.jitter.weight == 3.0
    scores = np.array([model.assess(r).score for r in rows])
    assert (scores < model.flag_below).mean() <= base.fit["max_flagged"] + 1 / len(rows)  # the same cap as the fit
    assert model.flag_below <= base.flag_below and model.fit["flag_below_without_jitter"] == base.flag_below
    assert model.fit["real_flagged_share"] == pytest.approx((scores < model.flag_below).mean())


# ---- a tiny run, its bundle and the runtime ----------------------------------------------------------------

def test_tiny_run_records_threshold_range_cleanup_and_qc(tiny_run):
    m = json.loads((tiny_run / "folds" / "fold_0" / "metrics.json").read_text())
    # the fixture's sweep (conftest.TINY_THRESHOLDS; the default 0.05-0.95 is tested in test_postprocess)
    assert m["threshold_range"] == [0.5, 0.7] and m["threshold_edge"] in (None, "low", "high")
    assert len(m["threshold_sweep"]) == 5 and "f1_cleaned" in m["threshold_sweep"][0]
    assert m["postprocess"]["format"] == "lungsam-postprocess/1"
    cal = load_calibration(m["qc"])  # version 2 (lungsam-qc/2): the map signals, the shape and image signals
    assert isinstance(cal, QcModel) and m["qc"]["format"] == "lungsam-qc/2"
    assert cal.n == m["n"]["val"] and set(FEATURES) <= set(cal.features)
    assert set(SHAPE_FEATURES + IMAGE_FEATURES) <= set(cal.features) and cal.n_degraded > 0
    assert 0 < cal.flag_below < 1 and QcModel.from_dict(m["qc"]).to_dict() == m["qc"]
    for r in m["per_image"]:
        assert set(r["qc"]) == {"score", "flag", "reasons"} and 0 <= r["qc"]["score"] <= 1
        assert "hd95" in r and "asd" in r
    assert m["test_qc_detection"]["n"] == m["n"]["test"]
    assert "hd95" in m["test"] and m["boundary_unit"].startswith("px")


def test_a_bundle_with_a_bad_quality_section_is_refused_naming_it(tiny_bundle, tmp_path):
    """The manifest's open ``qc`` object is validated once, at load (lungsam.runtime.bundle.Bundle.quality_model),
    and a bad one is a BundleError naming the bundle and the key (the in-graph path reads the same property)."""
    import hashlib
    import shutil

    from lungsam.manifest import BundleError
    from lungsam.runtime.segmenter import LungSegmenter

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    (bad / "manifest.json").chmod(0o644)
    (bad / "manifest.json.sha256").chmod(0o644)
    m = json.loads((bad / "manifest.json").read_text())
    m["qc"]["jitter"]["scale"] = 0.0
    data = json.dumps(m).encode()
    (bad / "manifest.json").write_bytes(data)
    (bad / "manifest.json.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    with pytest.raises(BundleError, match=r"bundle .*bundle: qc\.jitter\.scale: expected a number > 0"):
        LungSegmenter.load(bad)


def test_bundle_and_runtime_carry_postprocess_and_qc(tiny_run, tiny_bundle, tmp_path):
    from lungsam.data import demo_data_dir
    from lungsam.runtime.predict import predict_files
    from lungsam.runtime.segmenter import LungSegmenter

    man = json.loads((tiny_bundle / "manifest.json").read_text())
    fold = json.loads((tiny_run / "folds" / "fold_0" / "metrics.json").read_text())
    assert man["postprocess"] == fold["postprocess"] and man["qc"] == fold["qc"]
    assert man["parity"]["postprocess"] == fold["postprocess"]["enabled"]
    seg = LungSegmenter.load(tiny_bundle)
    images = sorted((demo_data_dir() / "images").iterdir())[:2]
    r = seg.segment(images[0])
    assert set(r.qc) == {"score", "flag", "reasons"} and 0.0 <= r.qc["score"] <= 1.0
    # the prompt-jitter term (a points run): ten decodes of the learned prompt's variants on the same embedding
    term = seg.qc.jitter
    assert term is not None and term.n == fold["n"]["val"]
    assert list(term.variants) == ["up", "down", "left", "right"] + [f"drop{i}" for i in range(6)]
    prepared = seg.preprocess(images[0])
    maps = seg.jitter_maps(seg.encode(prepared.model_input[None])[0], prepared.input_hw)
    assert len(maps) == 10 and all(m.shape == (seg.working_size,) * 2 and m.dtype == np.float32 for m in maps)
    direct = seg.qc.assess_map(seg.working_probability(*seg.decode(seg.encode(prepared.model_input[None]))[0][:1],
                                                       prepared.input_hw), seg.threshold, r.score, seg.cleanup,
                               image=prepared.model_input[:, :prepared.input_hw[0], :prepared.input_hw[1]]
                               .transpose(1, 2, 0), variants=maps)
    assert JITTER in direct.features and direct.score == pytest.approx(r.qc["score"], abs=1e-5)
    clicked = seg.segment(images[0], points=np.asarray([[150.0, 250.0], [350.0, 250.0]]))
    assert clicked.prompt == "interactive" and set(clicked.qc) == {"score", "flag", "reasons"}  # scored without it
    fast = LungSegmenter.load(tiny_bundle)
    fast.drop_qc_jitter()  # a site bound by CPU time: the logistic model alone, at the line it had before the term
    assert fast.qc.jitter is None and fast.qc.flag_below == fold["qc"]["fit"]["flag_below_without_jitter"]
    assert fast.describe()["qc_jitter"] is False and seg.describe()["qc_jitter"] is True
    assert 0.0 <= fast.segment(images[0]).qc["score"] <= 1.0
    with pytest.raises(Exception, match="site"):
        fast.use_site_operating_point(tmp_path / "site.json")
    out = tmp_path / "pred"
    predict_files(seg, images, out, overlay=True)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(set(x["qc"]) == {"score", "flag", "reasons"} for x in lines)
    assert (out / "contact_sheet.png").is_file()


def test_eval_scores_the_run_s_test_images_with_the_same_jitter_term(tiny_run, tmp_path):
    from click.testing import CliRunner

    from lungsam.cli import main
    from lungsam.data import DEMO_DATA

    r = CliRunner().invoke(main, ["eval", str(tiny_run), "--data", DEMO_DATA, "--split", "test", "--out",
                                  str(tmp_path / "ev"), "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    fold = json.loads((tiny_run / "folds" / "fold_0" / "metrics.json").read_text())
    assert fold["qc"]["jitter"] is not None
    mine = {x["id"]: x["qc"] for x in ev["per_image"]}
    for x in fold["per_image"]:
        assert JITTER in mine[x["id"]]["features"]
        assert mine[x["id"]]["score"] == pytest.approx(x["qc"]["score"], abs=1e-5)
        assert mine[x["id"]]["flag"] == x["qc"]["flag"]


def test_a_fold_decoded_again_reproduces_its_calibration_and_test_flags(tiny_run):
    """``lungsam.train.redecode`` (what the recalibration scripts use) decodes a finished fold as training did:
    its validation images give the fold's own calibration back (jitter term included) and its test images the
    same flags."""
    from lungsam.postprocess import CleanupSpec
    from lungsam.runs import load_run
    from lungsam.train.engine import score
    from lungsam.train.folds import assess_quality, calibrate_quality, with_jitter_term
    from lungsam.train.redecode import DEFAULT_JITTER, calibrated_jitter, decode_samples, encoder_config, fold_parts

    rm = load_run(tiny_run, 0)
    assert encoder_config(rm).size == rm.working_size and encoder_config(rm, 64).size == 64
    assert calibrated_jitter(rm) == (rm.metrics["qc"]["jitter"]["shift"], tuple(rm.metrics["qc"]["jitter"]["variants"]))
    parts = fold_parts(rm)
    assert [s.id for s in parts["test"]] == rm.split["test"]
    cleanup = CleanupSpec.from_dict(rm.metrics.get("postprocess"))
    val, test = (decode_samples(rm, parts[p], DEFAULT_JITTER) for p in ("val", "test"))
    cal = calibrate_quality(val.probs, val.iou, rm.threshold, cleanup, "fold 0 validation images", val.masks,
                            [s.mask for s in parts["train"]], val.images)
    f1, _ = score(val.probs, val.masks, rm.threshold, cleanup)
    cal = with_jitter_term(cal, val.probs, val.iou, rm.threshold, cleanup, val.jitter, f1, val.images)
    mine, theirs = cal.to_dict(), rm.metrics["qc"]
    assert mine["jitter"]["center"] == pytest.approx(theirs["jitter"]["center"], abs=1e-6)
    assert mine["flag_below"] == pytest.approx(theirs["flag_below"], abs=1e-6)
    assert mine["weights"] == pytest.approx(theirs["weights"], abs=1e-4)
    qc = assess_quality(cal, test.probs, test.iou, rm.threshold, cleanup, test.images, test.jitter)
    recorded = {r["id"]: r["qc"] for r in rm.metrics["per_image"]}
    for s, q in zip(test.samples, qc):
        assert q.score == pytest.approx(recorded[s.id]["score"], abs=1e-5) and q.flag == recorded[s.id]["flag"]
