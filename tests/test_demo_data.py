"""The demo's procedural dataset and pixel checker: ground truth passes, mismatched captions fail."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lumina_core.demo import checker, data
from lumina_core.tasks import get_task


def test_caption_grammar_counts_and_round_trip():
    captions = data.all_captions()
    singles = [c for c in captions if not c.is_pair]
    assert len(singles) == 6 * 3 * 5
    assert len(captions) - len(singles) == 18 * 15 * 4
    for caption in captions:
        assert data.parse_caption(caption.text()) == caption
    assert data.parse_caption("An Orange square to the left of a blue circle.").second == data.ShapeSpec("blue", "circle")
    assert data.Caption(data.ShapeSpec("orange", "circle"), position="in the center").text() == \
        "an orange circle in the center"


def test_bad_captions_raise_with_allowed_words():
    with pytest.raises(ValueError, match="unknown colour 'pink'; allowed"):
        data.parse_caption("a pink circle in the center")
    with pytest.raises(ValueError, match="not a demo caption.*shapes"):
        data.parse_caption("a red circle somewhere")
    with pytest.raises(ValueError, match="different colours"):
        data.Caption(data.ShapeSpec("red", "circle"), relation="above", second=data.ShapeSpec("red", "square"))


def test_held_out_split_is_fixed_disjoint_and_uses_known_words():
    train, held = data.split_captions()
    assert len(held) == data.HELD_OUT_SINGLES + data.HELD_OUT_PAIRS
    assert not set(train) & set(held)
    assert data.split_captions() == (train, held)
    seen_words = {w for c in train for w in c.text().split()}
    assert {w for c in held for w in c.text().split()} <= seen_words


def test_ground_truth_passes_checker():
    rng = np.random.default_rng(0)
    captions = data.all_captions()
    picks = [captions[i] for i in rng.choice(len(captions), 60, replace=False)]
    results = [checker.check_image(data.render(c, rng), c) for c in picks]
    assert all(r.ok_with_shape for r in results)


def test_mismatched_captions_are_near_chance():
    rng = np.random.default_rng(1)
    captions = data.all_captions()
    hits = 0
    for _ in range(60):
        shown, asked = (captions[i] for i in rng.choice(len(captions), 2, replace=False))
        hits += checker.check_image(data.render(shown, rng), asked).ok
    assert hits <= 6   # chance is about 2 %


def test_checker_catches_each_kind_of_error():
    rng = np.random.default_rng(2)
    red_circle = data.parse_caption("a red circle in the top left")
    image = data.render(red_circle, rng)
    assert not checker.check_image(image, data.parse_caption("a blue circle in the top left")).colour
    assert not checker.check_image(image, data.parse_caption("a red circle in the bottom right")).position
    wrong_shape = checker.check_image(image, data.parse_caption("a red square in the top left"))
    assert wrong_shape.ok and not wrong_shape.shape
    pair = data.parse_caption("a green triangle above a purple square")
    image = data.render(pair, rng)
    assert checker.check_image(image, pair).ok_with_shape
    assert not checker.check_image(image, data.parse_caption("a green triangle below a purple square")).position
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert not checker.check_image(blank, red_circle).colour


def test_dual_panel_samples_use_task_templates_and_edge_maps():
    rng = np.random.default_rng(3)
    caption = data.parse_caption("a yellow square to the right of a blue circle")
    control = data.make_sample("control_canny", caption, rng)
    assert control.image.shape == (128, 64, 3)
    assert control.prompt_text() == get_task("control_canny").template("official").format(
        w=64, h=128, prompt=caption.text())
    assert checker.check_image(control.lower, caption).ok_with_shape
    assert checker.edge_f1(data.edge_map(control.lower), control.upper) == 1.0
    dense = data.make_sample("dense_canny", caption, rng)
    assert "<lower half> displays a <canny edge map>" in dense.prompt_text()
    assert checker.check_image(dense.upper, caption).ok_with_shape
    # Edges trace the shapes: bright pixels only near colour boundaries, none on flat background.
    edges = dense.lower[:, :, 0] > 127
    assert 0.03 < edges.mean() < 0.3
    other = data.make_sample("dense_canny", data.parse_caption("a red circle in the bottom left"), rng)
    assert checker.edge_f1(other.lower, dense.lower) < 0.5
    with pytest.raises(ValueError, match="knows tasks"):
        data.make_sample("edit", caption, rng)


def test_iter_samples_mixes_tasks_and_write_dataset(tmp_path):
    train, held = data.split_captions()
    samples = [s for _, s in zip(range(200), data.iter_samples(train, seed=5))]
    tasks = {s.task for s in samples}
    assert tasks == set(data.DEMO_TASKS)
    assert not {s.caption for s in samples} & set(held)
    singles = sum(not s.caption.is_pair for s in samples) / len(samples)
    assert 0.25 < singles < 0.55
    path = data.write_dataset(tmp_path, 6, seed=1)
    records = json.loads(path.read_text())
    assert len(records) == 6
    for record in records:
        panels = [Image.open(tmp_path / record["image"])]
        if record["task"] != "t2i":
            panels.append(Image.open(tmp_path / record["second_image"]))
        assert all(p.size == (record["width"], record["height"] // len(panels)) for p in panels)
        assert data.parse_caption(record["prompt"])
