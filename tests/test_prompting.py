"""The prompt policy (where each image's box comes from): lungsam.runtime.prompting and manifest.inference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungsam.errors import ArgumentError
from lungsam.manifest import BOX_SOURCES, InferencePolicy
from lungsam.prompts import LearnedPrompt
from lungsam.runtime import BundleError
from lungsam.runtime.commands import BOX_SOURCE_CHOICES
from lungsam.runtime.prompting import (
    PromptPolicy,
    check_policy,
    resolve_policy,
    result_box_source,
    validated_box,
    validated_points,
)

POINTS = LearnedPrompt(mode="points", points=np.asarray([[0.3, 0.5]], np.float32), labels=np.ones(1, np.int32),
                       box=None, points_per_lung=1)
BOTH = LearnedPrompt(mode="both", points=np.asarray([[0.3, 0.5]], np.float32), labels=np.ones(1, np.int32),
                     box=np.asarray([0.1, 0.1, 0.9, 0.9], np.float32), points_per_lung=1)
AUTO_BOX = LearnedPrompt(mode="auto-box", points=None, labels=None, box=np.asarray([0.1, 0.1, 0.9, 0.9], np.float32),
                         points_per_lung=1)


def test_old_manifests_read_unchanged_and_the_alias_sets_the_box_source():
    p = "manifest.inference"
    assert InferencePolicy.from_dict({"box_from_first_pass": False}, p) == InferencePolicy()
    assert InferencePolicy().to_dict() == {"box_from_first_pass": False}  # what earlier exports wrote
    old_first_pass = InferencePolicy.from_dict({"box_from_first_pass": True}, p)
    assert old_first_pass.box_source == "first-pass"
    assert old_first_pass.to_dict() == {"box_from_first_pass": True, "box_source": "first-pass"}
    new = InferencePolicy.from_dict({"box_source": "first-pass"}, p)
    assert new.box_from_first_pass and new == old_first_pass
    assert InferencePolicy.from_dict(new.to_dict(), p) == new
    with pytest.raises(BundleError, match=r"manifest\.inference\.box_source: 'learned' contradicts"):
        InferencePolicy.from_dict({"box_from_first_pass": True, "box_source": "learned"}, p)
    with pytest.raises(BundleError, match=r"manifest\.inference\.box_source: unknown value 'telepathy'"):
        InferencePolicy.from_dict({"box_source": "telepathy"}, p)


def test_the_policy_is_the_callers_then_the_bundles_then_the_prompt_modes():
    bundle = InferencePolicy(box_source="first-pass")
    assert resolve_policy(bundle).box_source == "first-pass"
    assert resolve_policy(bundle, box_from_first_pass=False) == PromptPolicy(None)  # the mode's own
    assert resolve_policy(InferencePolicy(), box_from_first_pass=True).first_pass
    assert resolve_policy(bundle, box_source="given").box_source == "given"
    assert resolve_policy(None).box_source is None
    with pytest.raises(ArgumentError, match="contradicts"):
        resolve_policy(bundle, box_source="learned", box_from_first_pass=True)
    with pytest.raises(ArgumentError, match="box source 'nope'"):
        PromptPolicy("nope")
    assert PromptPolicy().source(POINTS) == "learned" and PromptPolicy().source(BOTH) == "given"
    assert PromptPolicy("first-pass").source(BOTH) == "first-pass"
    assert BOX_SOURCE_CHOICES == BOX_SOURCES  # the CLI's choices are the manifest's


def test_a_policy_the_bundle_cannot_follow_is_refused_with_its_reason():
    root = Path("bundles/b")
    with pytest.raises(BundleError, match="prompted with a box"):
        check_policy(PromptPolicy("first-pass"), POINTS, ["encoder", "decoder"], root)
    with pytest.raises(BundleError, match="needs the prompted decoder"):
        check_policy(PromptPolicy("first-pass"), BOTH, ["encoder", "decoder_fixed"], root)
    with pytest.raises(BundleError, match="'both' has no learned box"):
        check_policy(PromptPolicy("learned"), BOTH, ["encoder", "decoder"], root)
    check_policy(PromptPolicy("first-pass"), BOTH, ["encoder", "decoder"], root)
    check_policy(PromptPolicy("given"), POINTS, ["encoder", "decoder"], root)


def test_each_result_names_where_its_box_came_from():
    assert result_box_source("first-pass box", BOTH) == "first-pass"
    assert result_box_source("learned", AUTO_BOX) == "learned"
    assert result_box_source("learned", POINTS) is None  # a points prompt has no box
    assert result_box_source("interactive", POINTS, np.asarray([1, 2, 3], np.float32)) == "given"
    assert result_box_source("interactive", POINTS, np.asarray([1, 0, -1], np.float32)) is None


def test_caller_prompts_are_validated():
    np.testing.assert_array_equal(validated_box([1, 2, 3, 4]), [1, 2, 3, 4])
    for bad in ([3, 2, 1, 4], [1, 2, 3], [0, 0, np.nan, 1]):
        with pytest.raises(ValueError, match="box must be"):
            validated_box(bad)
    pts, labs = validated_points([[1, 2], [3, 4]], None)
    assert pts.dtype == np.float32 and labs.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="points must be"):
        validated_points(np.zeros((0, 2)), None)
    with pytest.raises(ValueError, match="labels must be"):
        validated_points([[1, 2]], [2])
