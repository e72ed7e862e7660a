"""The one fold loop and run orchestration (lungsam.train.folds) that lungsam train and train-unet share."""
from __future__ import annotations

import pytest

from lungsam.artifacts import read_json, write_json_atomic
from lungsam.errors import ArgumentError, OutputExistsError
from lungsam.layout import RunLayout
from lungsam.train.folds import config_differences, open_run, refuse_changed_settings

SAM_FOLD_KEYS = {"fold", "threshold", "threshold_sweep", "threshold_range", "threshold_edge", "postprocess",
                 "postprocess_choice", "n", "best_epoch", "epochs_run", "train_time_s", "epochs_wall_s", "fold_wall_s",
                 "val", "test", "boundary_unit", "qc", "test_qc_detection", "prompt_uses_ground_truth", "per_image"}
UNET_FOLD_KEYS = {"fold", "threshold", "threshold_sweep", "n", "best_epoch", "epochs_run", "train_time_s",
                  "epochs_wall_s", "fold_wall_s", "val", "test", "prompt_uses_ground_truth", "per_image"}


def test_open_run_refuses_folds_outside_the_run_and_a_run_without_resume(tmp_path):
    layout = RunLayout(tmp_path / "r")
    with pytest.raises(ArgumentError, match="--only-fold 3: the run has folds 0-2"):
        open_run(layout, False, (1, 3), 3)
    assert open_run(layout, False, (2,), 3) is None  # a new run
    write_json_atomic(layout.run_json, {"config": {"lr": 1e-3}})
    with pytest.raises(OutputExistsError, match="--resume"):
        open_run(layout, False, None, 3)
    assert open_run(layout, True, None, 3) == read_json(layout.run_json)


def test_config_differences_name_every_changed_setting_but_the_checkpoint_path(tmp_path):
    before = {"lr": 1e-3, "epochs": 5, "checkpoint": "/a/w.pt", "old_only": 1}
    now = {"lr": 1e-2, "epochs": 5, "checkpoint": "/b/w.pt", "new_only": 2}
    differ = config_differences(before, now)
    assert differ == ["lr: 0.001 -> 0.01", "new_only: None -> 2", "old_only: 1 -> None"]
    refuse_changed_settings(RunLayout(tmp_path), [])  # nothing differs: may resume
    with pytest.raises(ArgumentError, match=r"settings differ .*lr: 0.001 -> 0.01"):
        refuse_changed_settings(RunLayout(tmp_path), differ)


def test_sam_and_unet_folds_record_what_their_trainer_scores(tiny_run, tmp_path):
    """SAM folds choose threshold and clean-up, calibrate the quality flag and score boundaries; U-Net folds choose
    the threshold only and keep their best weights only: the same keys as before the fold loop was shared."""
    from lungsam.train.unet import UNetConfig, train_unet_run

    sam = read_json(RunLayout(tiny_run).fold(0).metrics_json)
    assert set(sam) == SAM_FOLD_KEYS
    assert set(sam["per_image"][0]) == {"id", "f1", "iou", "hd95", "asd", "qc"}
    assert {"hd95", "asd"} <= set(sam["test"])
    out = RunLayout(tmp_path / "unet")
    train_unet_run(UNetConfig(folds=1, epochs=1, size=32, channels=(4, 8), res_units=1, batch_size=4), out.root,
                   log=lambda m: None, progress=False)
    fold = out.fold(0)
    unet = read_json(fold.metrics_json)
    assert set(unet) == UNET_FOLD_KEYS and set(unet["test"]) == {"f1", "iou"}
    assert set(unet["per_image"][0]) == {"id", "f1", "iou"}
    assert fold.weights("unet", "best").exists() and not fold.weights("unet", "last").exists()
    assert fold.history_csv.read_text().splitlines()[0] == "epoch,train_loss,val_loss,val_f1,val_iou,epoch_s"
