"""Lung segmentation results as DICOM: Segmentation (SEG), TID 1500 measurement report (SR) and an optional
Secondary Capture overlay (SC), built with highdicom. Torch-free; needs ``lungsam[dicom]`` (pydicom, highdicom),
imported lazily so that ``import lungsam.runtime`` stays light.

This module is the one place that names, writes and reads back lungsam's DICOM results:

* :func:`laterality_rule` / :func:`split_lungs`: the combined lung mask (original frame ``(H0, W0)``, bool) is split
  into the patient's right and left lung. Rule (docs/pacs.md): the image axis that runs along the patient's
  left-right direction is the one whose ``PatientOrientation`` (0020,0020) value contains ``L`` or ``R`` (the first
  value = direction of increasing column index, the second = increasing row index). Along that axis the split line
  is the line with the fewest mask pixels in the middle third of the mask's extent (the mediastinum). Pixels on the
  side that the orientation names as patient-right form the right lung. Without ``PatientOrientation`` the standard
  radiographic display (``L\\F``: the patient's right lung on the image's left) is assumed and the results say so
  (:attr:`LateralityRule.basis`).
* :func:`dicom_results`: SEG (segment 1 right lung, SNOMED CT 3341006; segment 2 left lung, 44029006; BINARY, or
  FRACTIONAL = the probability map on each lung's side of the split line), SR (per lung: area in mm² when the pixel
  spacing is known, the quality score) referencing the SEG and the source, and optionally the SC overlay.
* UIDs are derived from the source SOP Instance UID and the bundle digest (:func:`result_uid`), so segmenting the same
  image again with the same bundle (e.g. a node restarted after a crash) gives the same instances, never duplicates.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import atomic_path, sha256_file
from ..errors import LungsamError
from ..manifest import MANIFEST_FILE

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from .bundle import Bundle
    from .segmenter import SegmentationResult

MANUFACTURER = "lungsam"
MODEL_NAME = "lungsam lung segmentation"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SC_SERIES_NUMBER = 9903
SEG_SERIES_DESCRIPTION = "lungsam lung segmentation"
SR_SERIES_DESCRIPTION = "lungsam lung measurements"
SC_SERIES_DESCRIPTION = "lungsam lung overlay (not for diagnosis)"
#: Private coding scheme for the quality score (no standard code exists for a model's own quality estimate).
CODING_SCHEME = "99LUNGSAM"
#: Chest radiograph SOP classes the results are made for (DX for presentation / processing, CR).
CHEST_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
OVERLAY_RGB = (0, 200, 80)
_UID_NAMESPACE = uuid.UUID("5b0f3c2e-8a41-5d0e-9c55-6c756e677361")  # lungsam's own namespace


class DicomOutputError(LungsamError, ValueError):
    """A source dataset that cannot carry lungsam's DICOM results (the reason names the attribute)."""


@dataclass(frozen=True)
class LateralityRule:
    """Where the patient's right lung lies in the image.

    Attributes:
        axis: image axis along the patient's left-right direction: 1 = columns (the usual), 0 = rows (image
            rotated by 90 degrees).
        right_at_low_index: True when the patient's right is towards index 0 on ``axis`` (standard PA/AP display,
            ``PatientOrientation`` ``L\\F``: the right lung on the image's left).
        basis: ``"PatientOrientation L\\F"`` (the tag that decided) or ``"assumed standard display (no
            PatientOrientation)"``.
    """

    axis: int
    right_at_low_index: bool
    basis: str


@dataclass
class DicomResults:
    """The DICOM objects made for one source image.

    Attributes:
        seg: the Segmentation (highdicom ``Segmentation``, a pydicom Dataset).
        sr: the TID 1500 measurement report (``Comprehensive3DSR``), or ``None``.
        sc: the Secondary Capture overlay, or ``None``.
        rule: how right and left were told apart.
        areas_mm2: ``{"right": mm², "left": mm²}`` or ``None`` without pixel spacing.
        areas_px: ``{"right": pixels, "left": pixels}``.
        quality: ``{"score": float, "source": "qc" | "predicted_iou", "flag": ...}``.
        result: the :class:`~lungsam.runtime.segmenter.SegmentationResult` they were made from.
    """

    seg: Any
    sr: Any | None
    sc: Any | None
    rule: LateralityRule
    areas_px: dict[str, int]
    areas_mm2: dict[str, float] | None
    quality: dict[str, Any] = field(default_factory=dict)
    result: Any = None

    def datasets(self) -> list[Any]:
        return [d for d in (self.seg, self.sr, self.sc) if d is not None]


# ---------------------------------------------------------------------------------------------
# laterality
# ---------------------------------------------------------------------------------------------

def laterality_rule(ds: Dataset) -> LateralityRule:
    """Which image axis and side hold the patient's right, from ``PatientOrientation`` (see the module doc).

    Raises :class:`DicomOutputError` when ``PatientOrientation`` is present but names no left-right direction
    (e.g. ``A\\F``, a lateral view), since the lungs cannot then be told apart by side."""
    po = [str(v).upper() for v in (ds.get("PatientOrientation") or [])]
    if not po:
        return LateralityRule(axis=1, right_at_low_index=True, basis="assumed standard display (no PatientOrientation)")
    if len(po) != 2:
        raise DicomOutputError(f"PatientOrientation {po!r} must have two values (row and column directions)")
    basis = f"PatientOrientation {po[0]}\\{po[1]}"
    for axis, value in ((1, po[0]), (0, po[1])):  # value 1: along increasing column index; value 2: increasing row
        if ("L" in value) != ("R" in value):
            # the direction of increasing index points to the patient's left: the right lung is at low indices
            return LateralityRule(axis=axis, right_at_low_index="L" in value, basis=basis)
    raise DicomOutputError(f"{basis} names no left-right direction (a lateral view?): the lungs cannot be told apart")


def split_line(mask: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the split between the two lungs: the line with the fewest mask pixels within the
    middle third of the mask's extent (ties: the one nearest the extent's centre). Pixels with index ``<`` it are
    one lung, ``>=`` it the other. An empty mask splits at the image centre."""
    profile = np.count_nonzero(mask, axis=1 - axis)
    nz = np.flatnonzero(profile)
    if nz.size == 0:
        return mask.shape[axis] // 2
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    a, b = lo + (hi - lo) // 3, hi - (hi - lo) // 3
    if b <= a:
        return (lo + hi) // 2
    window = profile[a:b]
    centre = (lo + hi - 1) / 2
    candidates = np.flatnonzero(window == window.min()) + a
    return int(candidates[np.argmin(np.abs(candidates - centre))])


def side_masks(shape: tuple[int, int], rule: LateralityRule, split: int) -> tuple[np.ndarray, np.ndarray]:
    """``(right_side, left_side)`` bool ``(H0, W0)`` half-planes of the image on either side of ``split``."""
    idx = np.arange(shape[rule.axis])
    low = idx < split
    low = low[None, :] if rule.axis == 1 else low[:, None]
    low = np.broadcast_to(low, shape)
    return (low, ~low) if rule.right_at_low_index else (~low, low)


def split_lungs(mask: np.ndarray, rule: LateralityRule) -> tuple[np.ndarray, np.ndarray]:
    """Combined ``(H0, W0)`` bool lung mask -> ``(right_lung, left_lung)`` bool masks (disjoint, union = mask)."""
    m = np.asarray(mask, bool)
    right_side, left_side = side_masks(m.shape, rule, split_line(m, rule.axis))
    return m & right_side, m & left_side


# ---------------------------------------------------------------------------------------------
# identification
# ---------------------------------------------------------------------------------------------

def bundle_digest(bundle: Bundle) -> str:
    """sha256 of the bundle's ``manifest.json`` bytes (the manifest lists every model file's sha256).

    Uses ``Bundle.digest`` where the runtime provides it (same definition)."""
    digest = getattr(bundle, "digest", None)
    return str(digest) if digest else sha256_file(Path(bundle.root) / MANIFEST_FILE)


def lungsam_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lungsam")
    except metadata.PackageNotFoundError:
        return "unknown"


def result_uid(source_sop_instance_uid: str, digest: str, kind: str) -> str:
    """A UID ``2.25.<int>`` (PS3.5 B.2: a UUID as an integer) from a name-based UUID (RFC 4122 version 5) of the
    source instance, the bundle digest and ``kind`` (``seg``, ``sr``, ``sc``, ``seg-series``, ...): the same
    inputs always give the same UID."""
    name = "\x1f".join(("lungsam", str(source_sop_instance_uid), digest, kind))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def check_source(ds: Dataset) -> None:
    """Refuse a source that cannot be referenced: missing UIDs or geometry (names the attribute)."""
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"):
        if not ds.get(tag):
            raise DicomOutputError(f"source dataset has no {tag}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise DicomOutputError(f"source has {frames} frames; lungsam segments single-frame radiographs")


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """``(row, col)`` mm per pixel: ``PixelSpacing``, else ``ImagerPixelSpacing`` (as :mod:`lungsam.imageio`)."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(tag)
        if v:
            return float(v[0]), float(v[1])
    return None


def _dicom_text(s: str, n: int = 64) -> str:
    return re.sub(r"[\\\x00-\x1f]", " ", s)[:n]


# ---------------------------------------------------------------------------------------------
# objects
# ---------------------------------------------------------------------------------------------

def _algorithm(digest: str, bundle: Bundle):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = {"bundle_sha256": digest, "backbone": str(bundle.manifest.get("backbone", "")),
              "threshold": f"{float(bundle.threshold):.6g}"}
    return hd.AlgorithmIdentificationSequence(name="lungsam", family=codes.cid7162.ArtificialIntelligence,
                                              version=lungsam_version(), source="lungsam", parameters=params)


def _segment_descriptions(algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    out = []
    for number, (label, code) in enumerate((("Right lung", Code("3341006", "SCT", "Right lung")),
                                            ("Left lung", Code("44029006", "SCT", "Left lung"))), start=1):
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=None, tracking_id=None))
    return out


def build_seg(ds: Dataset, right: np.ndarray, left: np.ndarray, digest: str, bundle: Bundle, *,
              probability: np.ndarray | None = None, right_side: np.ndarray | None = None):
    """The DICOM-SEG of one source image: ``right``/``left`` ``(H0, W0)`` bool masks are segments 1 and 2 (BINARY).

    FRACTIONAL when ``probability`` (``(H0, W0)`` float32 in [0, 1]) is given with ``right_side`` (the bool
    half-plane of the patient's right, :func:`side_masks`): segment 1 carries the probability on the right side,
    segment 2 on the left side (stored as 0..255, ``PROBABILITY``)."""
    import highdicom as hd

    h, w = int(ds.Rows), int(ds.Columns)
    if right.shape != (h, w) or left.shape != (h, w):
        raise DicomOutputError(f"mask {right.shape[0]} x {right.shape[1]} does not match the source's "
                               f"Rows x Columns {h} x {w}")
    if probability is not None:
        if right_side is None or probability.shape != (h, w):
            raise DicomOutputError("a FRACTIONAL segmentation needs the (Rows, Columns) probability map and the "
                                   "right-side half-plane")
        p = np.clip(np.asarray(probability, np.float32), 0.0, 1.0)
        pixels = np.stack([np.where(right_side, p, 0.0), np.where(right_side, 0.0, p)], axis=-1)[None]
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = np.stack([right, left], axis=-1)[None].astype(np.uint8)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    seg = hd.seg.Segmentation(
        source_images=[ds], pixel_array=pixels, segmentation_type=seg_type,
        segment_descriptions=_segment_descriptions(_algorithm(digest, bundle)),
        series_instance_uid=result_uid(ds.SeriesInstanceUID, digest, "seg-series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=result_uid(ds.SOPInstanceUID, digest, "seg"),
        instance_number=int(ds.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=lungsam_version(), device_serial_number=digest[:16],
        series_description=SEG_SERIES_DESCRIPTION, content_description="Lungs segmented by lungsam",
        content_label="LUNGS", omit_empty_frames=False)
    _projection_geometry(seg, ds)
    return seg


def _projection_geometry(seg: Any, ds: Dataset) -> None:
    """Carry a projection radiograph's geometry in its SEG: the source's ``PatientOrientation`` (Type 2C in the
    General Image module) and its pixel spacing as the same top-level attribute (``ImagerPixelSpacing`` or
    ``PixelSpacing``). The Pixel Measures functional group highdicom adds from ``PixelSpacing`` is removed: it needs
    a Slice Thickness (dciodvfy, and highdicom to read the SEG back), which a projection image does not have. The
    SEG shares the source's pixel grid (same Rows x Columns, one frame per segment)."""
    seg.PatientOrientation = list(ds.get("PatientOrientation") or [])
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared:
        del shared.PixelMeasuresSequence
    for tag in ("ImagerPixelSpacing", "PixelSpacing"):
        if ds.get(tag):
            setattr(seg, tag, list(ds.get(tag)))


def _quality(result: SegmentationResult) -> dict[str, Any]:
    """The score the SR reports: the result's ``qc`` dict ``{score, flag, reasons}`` where present, else the
    decoder's predicted IoU."""
    qc = getattr(result, "qc", None)
    if isinstance(qc, dict) and qc.get("score") is not None:
        return {"score": float(qc["score"]), "source": "qc", "flag": qc.get("flag"),
                "reasons": list(qc.get("reasons") or [])}
    return {"score": float(result.score), "source": "predicted_iou", "flag": None, "reasons": []}


def _segment_frame(seg: Any, segment_number: int) -> int:
    """The SEG frame (1-based) that holds ``segment_number`` (one frame per segment for a radiograph)."""
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == segment_number:
            return i
    raise DicomOutputError(f"SEG {seg.SOPInstanceUID} has no frame for segment {segment_number}")


LUNG_SIDES = (("right", "3341006", "Right lung"), ("left", "44029006", "Left lung"))  # SNOMED CT, SEG segment 1, 2


def build_sr(ds: Dataset, seg: Any, areas_mm2: dict[str, float] | None, quality: dict[str, Any], digest: str,
             bundle: Bundle):
    """TID 1500 measurement report (``Comprehensive3DSR``): one planar ROI group per lung referencing its SEG
    segment and the source image, with the lung's area (mm², when the pixel spacing is known) and the quality
    score (``99LUNGSAM`` code: ``predicted-iou`` or ``qc-score``; with a qc flag also a qualitative evaluation)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algo = hd.sr.AlgorithmIdentification(name="lungsam", version=lungsam_version(),
                                         parameters=[f"bundle_sha256={digest}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", digest, "observer"), name="lungsam", manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME))
    groups = [_lung_roi_group(ds, seg, number, side, Code(code, "SCT", meaning), areas_mm2, quality, digest, algo)
              for number, (side, code, meaning) in enumerate(LUNG_SIDES, start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=Code("399208008", "SCT", "Plain chest X-ray"), imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ds, seg], content=report[0],
        series_instance_uid=result_uid(ds.SeriesInstanceUID, digest, "sr-series"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(ds.SOPInstanceUID, digest, "sr"),
        instance_number=int(ds.get("InstanceNumber") or 1), manufacturer=MANUFACTURER, is_complete=True,
        series_description=SR_SERIES_DESCRIPTION)
    _segment_references_by_number(sr)
    sr.CodingSchemeIdentificationSequence = [_coding_scheme()]
    return sr


def _score_code(quality: dict[str, Any]):
    """The ``99LUNGSAM`` concept of the reported score: ``qc-score`` or ``predicted-iou``."""
    from pydicom.sr.coding import Code

    if quality["source"] == "qc":
        return Code("qc-score", CODING_SCHEME, "Lung segmentation quality score")
    return Code("predicted-iou", CODING_SCHEME, "Predicted IoU of the lung segmentation")


def _lung_roi_group(ds: Dataset, seg: Any, number: int, side: str, finding: Any, areas_mm2: dict[str, float] | None,
                    quality: dict[str, Any], digest: str, algo: Any):
    """One lung's TID 1410 group: its area (with a pixel spacing) and the score, the qc flag as a qualitative
    evaluation, referencing SEG segment ``number`` and the source image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    measurements = []
    if areas_mm2 is not None:
        measurements.append(hd.sr.Measurement(name=codes.SCT.Area, value=round(areas_mm2[side], 3),
                                              unit=codes.UCUM.SquareMillimeter, algorithm_id=algo))
    measurements.append(hd.sr.Measurement(name=_score_code(quality), value=round(quality["score"], 6),
                                          unit=Code("1", "UCUM", "no units"), algorithm_id=algo))
    evaluations = None
    if quality.get("flag") is not None:
        flag = str(quality["flag"])
        evaluations = [hd.sr.QualitativeEvaluation(
            name=Code("qc-flag", CODING_SCHEME, "Lung segmentation quality flag"),
            value=Code(_dicom_text(flag, 16), CODING_SCHEME, _dicom_text(flag)))]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(ds.SOPInstanceUID, digest, f"roi-{side}"),
                                                     identifier=f"{side} lung"),
        referenced_segment=hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            frame_number=_segment_frame(seg, number), segment_number=number,
            source_image=hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID)),
        finding_type=finding, algorithm_id=algo, measurements=measurements, qualitative_evaluations=evaluations)


def _coding_scheme() -> Dataset:
    """The Coding Scheme Identification item of the private ``99LUNGSAM`` scheme."""
    from pydicom.dataset import Dataset as _Dataset

    scheme = _Dataset()
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "lungsam quality codes"
    scheme.CodingSchemeResponsibleOrganization = "lungsam"
    return scheme


def _segment_references_by_number(node: Any) -> None:
    """In every reference to a segmentation that names both ``ReferencedSegmentNumber`` and
    ``ReferencedFrameNumber`` (highdicom's planar segmentation-frame reference), keep the segment number only:
    PS3.3 C.18.3.1 allows one or the other (dciodvfy errors on both); the segment identifies the frame."""
    for item in node.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
                del ref.ReferencedFrameNumber
        _segment_references_by_number(item)


def overlay_rgb(pixels: np.ndarray, right: np.ndarray, left: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """``(H0, W0, 3)`` uint8: the image (8-bit gray) with both lungs tinted and their borders drawn solid; the split
    line between the lungs shows as the border where they meet."""
    from ..preprocess import to_rgb_uint8

    rgb = to_rgb_uint8(pixels).astype(np.float32)
    c = np.asarray(OVERLAY_RGB, np.float32)
    for m in (right, left):
        rgb[m] = (1 - alpha) * rgb[m] + alpha * c
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = c
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def build_sc(ds: Dataset, rgb: np.ndarray, digest: str):
    """Secondary Capture (RGB, 8-bit) of the overlay for viewers that cannot show SEG; same study, its own series."""
    import highdicom as hd

    po = ds.get("PatientOrientation")
    spacing = pixel_spacing(ds)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ds, pixel_array=rgb, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(ds.SeriesInstanceUID, digest, "sc-series"), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(ds.SOPInstanceUID, digest, "sc"),
        instance_number=int(ds.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
        patient_orientation=tuple(str(v) for v in po) if po and len(po) == 2 else ("L", "F"),
        pixel_spacing=spacing, series_description=SC_SERIES_DESCRIPTION)
    sc.BurnedInAnnotation = "NO"
    sc.Laterality = ds.get("Laterality", "")  # General Series, Type 2C
    return sc


def dicom_results(ds: Dataset, result: SegmentationResult, bundle: Bundle, *, fractional: bool = False,
                  sr: bool = True, secondary_capture: bool = False) -> DicomResults:
    """SEG (and SR, SC) for ``result``, the segmentation of the source dataset ``ds`` (same ``Rows x Columns``).

    ``ds`` may be read with ``stop_before_pixels=True``; the SC needs ``result.pixels``."""
    check_source(ds)
    rule = laterality_rule(ds)
    mask = np.asarray(result.mask, bool)
    right_side, _ = side_masks(mask.shape, rule, split_line(mask, rule.axis))
    right, left = mask & right_side, mask & ~right_side
    digest = bundle_digest(bundle)
    seg = build_seg(ds, right, left, digest, bundle, probability=result.probability if fractional else None,
                    right_side=right_side)
    areas_px = {"right": int(right.sum()), "left": int(left.sum())}
    spacing = pixel_spacing(ds)
    areas_mm2 = None if spacing is None else {k: v * spacing[0] * spacing[1] for k, v in areas_px.items()}
    quality = _quality(result)
    report = build_sr(ds, seg, areas_mm2, quality, digest, bundle) if sr else None
    sc = None
    if secondary_capture:
        if result.pixels is None:
            raise DicomOutputError("a Secondary Capture overlay needs the image pixels (result.pixels)")
        sc = build_sc(ds, overlay_rgb(result.pixels, right, left), digest)
    return DicomResults(seg=seg, sr=report, sc=sc, rule=rule, areas_px=areas_px, areas_mm2=areas_mm2,
                        quality=quality, result=result)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

OUTPUT_SUFFIXES = {"seg": "_seg.dcm", "sr": "_sr.dcm", "sc": "_sc.dcm"}


def write_dataset(path: str | Path, ds: Any) -> None:
    """Write a DICOM file atomically (Part 10, with its file meta)."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_dicom_results(results: DicomResults, out_dir: str | Path, stem: str) -> dict[str, str]:
    """Write ``<stem>_seg.dcm`` (``_sr.dcm``, ``_sc.dcm``) into ``out_dir``; returns ``{kind: file name}``."""
    out = Path(out_dir)
    names: dict[str, str] = {}
    for kind, ds in (("seg", results.seg), ("sr", results.sr), ("sc", results.sc)):
        if ds is not None:
            names[kind] = stem + OUTPUT_SUFFIXES[kind]
            write_dataset(out / names[kind], ds)
    return names


def read_seg_masks(source: Any) -> dict[str, np.ndarray]:
    """A lungsam SEG (path or Dataset) -> ``{"right": (H0, W0), "left": (H0, W0)}`` via highdicom: bool for
    BINARY, float32 probabilities in [0, 1] for FRACTIONAL."""
    import highdicom as hd

    seg = hd.seg.segread(source) if isinstance(source, (str, Path)) else hd.seg.Segmentation.from_dataset(source)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[seg.SourceImageSequence[0].ReferencedSOPInstanceUID]
        if "SourceImageSequence" in seg else [seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                                              .ReferencedSOPInstanceUID],
        segment_numbers=[1, 2], rescale_fractional=True, dtype=np.float32 if fractional else np.uint8)
    out = {"right": frames[0, :, :, 0], "left": frames[0, :, :, 1]}
    return {k: (v.astype(np.float32) if fractional else v.astype(bool)) for k, v in out.items()}


def dicom_record_hook(bundle: Bundle, *, fractional: bool = False, sr: bool = False,
                      secondary_capture: bool = False):
    """A ``record_hook`` for :func:`lungsam.runtime.predict.predict_files`: for a DICOM input, writes
    ``<stem>_seg.dcm`` (and ``_sr.dcm``, ``_sc.dcm``) beside the mask and returns ``{"dicom": {"seg": ..., "sr": ...,
    "sc": ..., "laterality": basis, "areas_mm2": {...}}}``; other inputs get ``{"dicom": None}``."""
    from ..imageio import is_dicom

    def hook(path: Path, stem: str, result: SegmentationResult, out_dir: Path) -> dict:
        if not is_dicom(Path(path)):
            return {"dicom": None}
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types
            raise DicomOutputError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
        try:
            made = dicom_results(ds, result, bundle, fractional=fractional, sr=sr,
                                 secondary_capture=secondary_capture)
        except DicomOutputError as e:
            raise DicomOutputError(f"{path}: {e}") from e
        names = write_dicom_results(made, out_dir, stem)
        areas = None if made.areas_mm2 is None else {k: round(v, 3) for k, v in made.areas_mm2.items()}
        return {"dicom": {**names, "laterality": made.rule.basis, "areas_mm2": areas,
                          "seg_sop_instance_uid": str(made.seg.SOPInstanceUID)}}

    return hook
