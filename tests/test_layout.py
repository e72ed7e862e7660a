"""The folder layouts name each file once; the fold list reads what is on disk."""
from pathlib import Path

import pytest

from lungsam.layout import FoldLayout, PredictLayout, RunLayout


def test_run_layout_names_the_files_of_a_run(tmp_path):
    run = RunLayout(tmp_path)
    assert run.run_json == tmp_path / "run.json"
    assert run.fold(3).metrics_json == tmp_path / "folds" / "fold_3" / "metrics.json"
    assert run.fold(0).weights("decoder", "best").name == "decoder_best.safetensors"
    assert run.fold(1).weights("encoder_lora", "last").name == "encoder_lora_last.safetensors"
    assert run.fold(12).index == 12


def test_weights_name_and_which_are_checked(tmp_path):
    with pytest.raises(ValueError, match="weights name"):
        FoldLayout(tmp_path).weights("encoder", "best")
    with pytest.raises(ValueError, match="best"):
        FoldLayout(tmp_path).weights("decoder", "final")


def test_existing_folds_in_numeric_order_and_ignores_strays(tmp_path):
    run = RunLayout(str(tmp_path))
    assert run.existing_folds() == []
    for name in ("fold_10", "fold_2", "fold_x", "notes"):
        (tmp_path / "folds" / name).mkdir(parents=True)
    (tmp_path / "folds" / "fold_3").write_text("a file, not a fold")
    assert [f.index for f in run.existing_folds()] == [2, 10]


def test_predict_layout_per_image_files(tmp_path):
    out = PredictLayout(Path(tmp_path))
    assert out.mask_png("a").name == "a_mask.png" and out.overlay_png("a").name == "a_overlay.png"
    assert out.predictions_jsonl.parent == tmp_path
