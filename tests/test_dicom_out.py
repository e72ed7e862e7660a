"""Results as DICOM: SEG / SR / SC built with highdicom from real radiographs, validated with dciodvfy, read back."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from lungsam.artifacts import sha256_file
from lungsam.runtime import LungSegmenter
from lungsam.runtime import dicom_out as do
from lungsam.runtime.commands import predict

from .conftest import MONTGOMERY, need
from .dicom_samples import chest_dataset, write_chest_dicom

DCIODVFY = shutil.which("dciodvfy")


def montgomery(i: int = 0) -> tuple[Path, np.ndarray]:
    img = sorted(need(MONTGOMERY / "images").glob("*.png"))[i]
    return img, np.asarray(Image.open(MONTGOMERY / "masks" / img.name)) > 0


def dciodvfy_errors(path: Path) -> list[str]:
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def seg(tiny_bundle) -> LungSegmenter:
    return LungSegmenter.load(tiny_bundle, threads=1)


# ---------------------------------------------------------------------------------------------
# right and left
# ---------------------------------------------------------------------------------------------

def test_pa_image_right_lung_is_on_the_image_left_and_ap_flipped_on_the_right():
    img, mask = montgomery(0)
    pa = chest_dataset(img, orientation=("L", "F"))
    rule = do.laterality_rule(pa)
    assert (rule.axis, rule.right_at_low_index) == (1, True) and rule.basis == "PatientOrientation L\\F"
    right, left = do.split_lungs(mask, rule)
    assert not (right & left).any() and np.array_equal(right | left, mask)
    cols = np.arange(mask.shape[1])
    assert cols[right.any(0)].mean() < mask.shape[1] / 2 < cols[left.any(0)].mean()
    # each half is one real lung of this manual mask: similar sizes, the split in the mediastinum
    assert 0.6 < right.sum() / left.sum() < 1.6
    assert cols[right.any(0)].max() < cols[left.any(0)].min()

    # the same patient shown AP from the front (pixels mirrored, PatientOrientation R\F): same lungs, mirrored
    ap = chest_dataset(img, orientation=("R", "F"), flip=True)
    rule_ap = do.laterality_rule(ap)
    assert (rule_ap.axis, rule_ap.right_at_low_index) == (1, False)
    right_ap, left_ap = do.split_lungs(mask[:, ::-1], rule_ap)
    np.testing.assert_array_equal(right_ap, right[:, ::-1])
    np.testing.assert_array_equal(left_ap, left[:, ::-1])


def test_laterality_rotated_absent_and_lateral():
    img, mask = montgomery(1)
    rot = do.laterality_rule(chest_dataset(img, orientation=("H", "L")))  # rotated: rows run to the patient's left
    assert (rot.axis, rot.right_at_low_index) == (0, True)
    right, _ = do.split_lungs(mask.T, rot)  # the transposed image: lungs one above the other
    r0, _ = do.split_lungs(mask, do.laterality_rule(chest_dataset(img)))
    np.testing.assert_array_equal(right, r0.T)
    absent = do.laterality_rule(chest_dataset(img, orientation=None))
    assert absent.right_at_low_index and "assumed" in absent.basis
    with pytest.raises(do.DicomOutputError, match="no left-right direction"):
        do.laterality_rule(chest_dataset(img, orientation=("A", "F")))


# ---------------------------------------------------------------------------------------------
# SEG, SR, SC on a real bundle
# ---------------------------------------------------------------------------------------------

def test_segment_dicom_seg_sr_sc_validate_and_read_back(seg, tmp_path):
    img, _ = montgomery(2)
    ds = chest_dataset(img)
    made = seg.segment_dicom(ds, sr=True, secondary_capture=True)
    r = made.result
    right, left = do.split_lungs(r.mask, do.laterality_rule(ds))
    names = do.write_dicom_results(made, tmp_path, "x")
    assert names == {"seg": "x_seg.dcm", "sr": "x_sr.dcm", "sc": "x_sc.dcm"}
    for name in names.values():
        assert dciodvfy_errors(tmp_path / name) == [], name

    s = pydicom.dcmread(tmp_path / "x_seg.dcm")
    assert s.Modality == "SEG" and s.SegmentationType == "BINARY"
    assert s.StudyInstanceUID == ds.StudyInstanceUID and s.SeriesInstanceUID != ds.SeriesInstanceUID
    assert s.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert list(s.PatientOrientation) == ["L", "F"] and [float(v) for v in s.ImagerPixelSpacing] == [0.7, 0.7]
    ref = s.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == ds.SeriesInstanceUID
    assert (ref.ReferencedInstanceSequence[0].ReferencedSOPClassUID,
            ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert [(x.SegmentLabel, x.SegmentedPropertyTypeCodeSequence[0].CodeValue) for x in s.SegmentSequence] == [
        ("Right lung", "3341006"), ("Left lung", "44029006")]
    algo = s.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    digest = sha256_file(seg.bundle.root / "manifest.json")
    assert algo.AlgorithmName == "lungsam" and digest in str(algo.AlgorithmParameters)
    assert (s.Manufacturer, s.SeriesNumber, s.SeriesDescription) == ("lungsam", 9901, "lungsam lung segmentation")
    back = do.read_seg_masks(tmp_path / "x_seg.dcm")
    np.testing.assert_array_equal(back["right"], right)
    np.testing.assert_array_equal(back["left"], left)

    sr = pydicom.dcmread(tmp_path / "x_sr.dcm")
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.Modality == "SR"
    evidence = {i.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for se in e.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID, s.SOPInstanceUID}
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_planar_roi_measurement_groups()
    assert [g.reference_type.value for g in groups] == ["121214"] * 2  # DCM 121214 "Referenced Segmentation Frame"
    values = {}
    for g in groups:
        (site,) = [g.finding_type.value]
        values[site] = {m.name.value: m.value for m in g.get_measurements()}
    assert values["3341006"]["42798000"] == pytest.approx(right.sum() * 0.49, abs=1e-3)
    assert values["44029006"]["42798000"] == pytest.approx(left.sum() * 0.49, abs=1e-3)
    if r.qc is None:  # a bundle without a quality calibration: the decoder's predicted IoU
        assert values["3341006"]["predicted-iou"] == pytest.approx(r.score, abs=1e-6)
    else:  # the calibrated quality flag's score (lungsam.qc)
        assert values["3341006"]["qc-score"] == pytest.approx(r.qc["score"], abs=1e-6)

    sc = pydicom.dcmread(tmp_path / "x_sc.dcm")
    assert sc.StudyInstanceUID == ds.StudyInstanceUID and sc.PhotometricInterpretation == "RGB"
    assert sc.pixel_array.shape == (ds.Rows, ds.Columns, 3)

    # the same image with the same bundle gives the same instances (a restarted node sends no duplicates)
    again = seg.segment_dicom(ds, sr=True)
    assert again.seg.SOPInstanceUID == s.SOPInstanceUID and again.sr.SOPInstanceUID == sr.SOPInstanceUID


def test_fractional_seg_carries_the_probability_map_and_qc_score_is_used(seg, tmp_path):
    img, _ = montgomery(3)
    ds = chest_dataset(img, spacing_mm=None)
    made = seg.segment_dicom(ds, fractional=True, sr=False)
    assert made.sr is None and made.sc is None and made.areas_mm2 is None
    do.write_dicom_results(made, tmp_path, "f")
    assert dciodvfy_errors(tmp_path / "f_seg.dcm") == []
    back = do.read_seg_masks(tmp_path / "f_seg.dcm")
    p = made.result.probability
    right_side, _ = do.side_masks(p.shape, made.rule, do.split_line(made.result.mask, made.rule.axis))
    np.testing.assert_allclose(back["right"], np.where(right_side, p, 0), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(back["left"], np.where(right_side, 0, p), atol=0.5 / 255 + 1e-6)

    # engineer F's qc dict on results, where present, is the SR's quality score (and its flag an evaluation)
    r = made.result
    r.qc = {"score": 0.42, "flag": "review", "reasons": ["small lungs"]}
    out = do.dicom_results(ds, r, seg.bundle, sr=True)
    assert out.quality == {"score": 0.42, "source": "qc", "flag": "review", "reasons": ["small lungs"]}
    do.write_dicom_results(out, tmp_path, "q")
    assert dciodvfy_errors(tmp_path / "q_sr.dcm") == []
    g = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "q_sr.dcm")).content \
        .get_planar_roi_measurement_groups()[0]
    assert {m.name.value: m.value for m in g.get_measurements()} == {"qc-score": 0.42}


def test_predict_dicom_seg_writes_results_beside_the_masks(tiny_bundle, tmp_path):
    img, _ = montgomery(4)
    inp = tmp_path / "in"
    write_chest_dicom(img, inp / "chest.dcm")
    shutil.copy(img, inp / "plain.png")
    write_chest_dicom(img, inp / "lateral.dcm", orientation=("A", "F"), index=1)
    res = CliRunner().invoke(predict, [str(tiny_bundle), str(inp), "--out", str(tmp_path / "out"), "--dicom-seg",
                                       "--sr", "--secondary-capture", "--no-progress"])
    assert res.exit_code == 1, res.output  # the lateral view cannot be split into right and left: an error line
    recs = {Path(r["file"]).name: r for r in map(json.loads, (tmp_path / "out" / "predictions.jsonl").open())}
    assert recs["plain.png"]["status"] == "ok" and recs["plain.png"]["dicom"] is None
    assert recs["lateral.dcm"]["status"] == "error" and "no left-right direction" in recs["lateral.dcm"]["error"]
    d = recs["chest.dcm"]["dicom"]
    assert (d["seg"], d["sr"], d["sc"]) == ("chest_seg.dcm", "chest_sr.dcm", "chest_sc.dcm")
    assert d["laterality"] == "PatientOrientation L\\F" and set(d["areas_mm2"]) == {"right", "left"}
    back = do.read_seg_masks(tmp_path / "out" / "chest_seg.dcm")
    mask = np.asarray(Image.open(tmp_path / "out" / recs["chest.dcm"]["mask"])) > 0
    np.testing.assert_array_equal(back["right"] | back["left"], mask)
    assert not (tmp_path / "out" / "plain_seg.dcm").exists()

    bad = CliRunner().invoke(predict, [str(tiny_bundle), str(inp), "--out", str(tmp_path / "o2"), "--sr"])
    assert bad.exit_code == 2 and "go with --dicom-seg" in bad.output
