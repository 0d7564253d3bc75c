"""Batch runs end to end on a tiny random official-format checkpoint: outputs, resume, failures, best-of-N."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lumina_core.batchgen import BatchOptions, ItemDefaults, RankInfo, read_jsonl_records, run_batch
from lumina_core.sampling import SamplingConfig
from lumina_core.testing.checkpoints import write_tiny_checkpoint
from lumina_core.verify import Verifier

SAMPLING = SamplingConfig(cfg=2.0, top_k=16)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), words="a red cube blue ball room fox",
                                 max_grids=4)


class Loader:
    """Loads the tiny pipeline on demand and counts loads (a rerun with nothing to do must not load)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.loads = folder, 0
        self.pipe = None

    def __call__(self, device: str):
        from lumina_core.pipeline import LuminaPipeline

        self.loads += 1
        if self.pipe is None:
            self.pipe = LuminaPipeline.from_pretrained(str(self.folder), device=device)
        return self.pipe


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _options(**kw) -> BatchOptions:
    base = dict(defaults=ItemDefaults(width=32, height=32, num_images=1), sampling=SAMPLING, progress=False,
                settings={"model": "tiny"})
    base.update(kw)
    return BatchOptions(**base)


def test_run_writes_images_manifest_summary_then_resumes(tmp_path, tiny_model, capsys):
    prompts = _write(tmp_path / "p.jsonl", [
        {"prompt": "a red cube"}, {"prompt": "a blue ball", "images": 2, "size": "64x32"},
        {"prompt": "off grid", "size": "40x32"}, {"prompt": "a fox", "seed": 5},
        # 4 grids is this tiny model's largest size: 160 px needs a size token it does not have.
        {"prompt": "too big for the model", "size": "160x160"},
        '{"prompt": "malformed"',
        {"prompt": "edit me", "task": "edit", "reference": "nowhere.png", "size": "32x64"},
    ])
    out = tmp_path / "out"
    loader = Loader(tiny_model)
    summary = run_batch(prompts, out, loader, _options(progress=True), RankInfo())
    assert summary.items == 4 and summary.generated == 3 and summary.images == 4
    assert [b.line for b in summary.bad_lines] == [3, 6, 7]
    assert "multiple of 32" in summary.bad_lines[0].reason and "malformed JSON" in summary.bad_lines[1].reason
    assert "nowhere.png" in summary.bad_lines[2].reason
    assert [f["line"] for f in summary.failures] == [5] and summary.failures[0]["reason"]
    text = summary.text()
    assert "3 bad lines" in text and "line 6: malformed JSON" in text and "failed line 5" in text
    assert "rank 0/1" in capsys.readouterr().err   # the rank's progress bar
    assert summary.seconds_per_image > 0

    assert sorted(p.name for p in out.iterdir()) == ["00000_0.png", "00001_0.png", "00001_1.png", "00003_0.png",
                                                    "manifest.jsonl", "summary.json"]
    assert Image.open(out / "00001_1.png").size == (64, 32)
    records = read_jsonl_records(out / "manifest.jsonl")
    assert [(r["key"], r["status"]) for r in records] == [("00000", "ok"), ("00001", "ok"), ("00003", "ok"),
                                                          ("00004", "failed")]
    ok = {r["key"]: r for r in records if r["status"] == "ok"}
    assert ok["00001"]["seeds"] == [1000, 1001] and ok["00003"]["seeds"] == [5]   # index x 1000, or given
    assert ok["00000"]["settings"]["sampling"]["cfg"] == 2.0 and ok["00000"]["settings"]["model"] == "tiny"
    assert all(r["seconds"] > 0 and r["rank"] == 0 for r in ok.values())
    saved = json.loads((out / "summary.json").read_text())
    assert saved["generated"] == 3 and [b["line"] for b in saved["bad_lines"]] == [3, 6, 7]
    assert saved["failures"][0]["line"] == 5

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    loads = loader.loads
    again = run_batch(prompts, out, loader, _options(), RankInfo())
    # Done items are skipped; only the failed one is tried again (and fails again).
    assert again.skipped_done == 3 and again.generated == 0 and [f["line"] for f in again.failures] == [5]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert loader.loads == loads + 1

    # Drop the failing line: nothing left to do, so the model is not even loaded.
    lines = prompts.read_text().splitlines()[:4]
    _write(prompts, lines)
    run_batch(prompts, out, loader, _options(), RankInfo())
    assert loader.loads == loads + 1

    # A changed prompt is a different request: that item alone is regenerated, the line keys stay unique.
    lines[0] = json.dumps({"prompt": "a blue cube"})
    _write(prompts, lines)
    changed = run_batch(prompts, out, loader, _options(), RankInfo())
    assert changed.generated == 1 and changed.skipped_done == 2
    assert (out / "00000_0.png").stat().st_mtime_ns != mtimes["00000_0.png"]
    keys = [r["key"] for r in read_jsonl_records(out / "manifest.jsonl")]
    assert len(keys) == len(set(keys))


def test_same_item_same_images_regardless_of_order_or_rank_share(tmp_path, tiny_model):
    prompts = _write(tmp_path / "p.txt", ["a red cube", "a blue ball", "a room"])
    loader = Loader(tiny_model)
    run_batch(prompts, tmp_path / "all", loader, _options(), RankInfo())
    # Rank 1 of 2 alone (no process group needed to draw its share): its items match the full run's.
    run_batch(prompts, tmp_path / "half", loader, _options(), RankInfo(rank=1, world_size=2))
    half = sorted(p.name for p in (tmp_path / "half").glob("*.png"))
    assert half == ["00001_0.png"]
    assert (Image.open(tmp_path / "half" / half[0]).tobytes() == Image.open(tmp_path / "all" / half[0]).tobytes())


def test_pairs_layout_end_to_end_feeds_train_prepare_format(tmp_path, tiny_model):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a room", "task": "pair_depth", "size": "32x64"},
                                             {"prompt": "a fox", "task": "pair_canny", "size": "32x64", "images": 2}])
    out = tmp_path / "pairs"
    summary = run_batch(prompts, out, Loader(tiny_model), _options(layout="pairs"), RankInfo())
    assert summary.images == 3 and not summary.failures
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["00000_0", "00001_0", "00001_1"]
    from lumina_core.train.data import read_description, parse_item
    raw = read_description(out / "pairs.jsonl")
    for n, entry in enumerate(raw):
        item = parse_item(entry, out, n)
        assert Image.open(item.image).size == (32, 32) and Image.open(item.second_image).size == (32, 32)
        assert item.task in ("pair_depth", "pair_canny")


class Brightness(Verifier):
    """A pixel-only verifier: mean grey level (no model to load)."""

    name = "brightness"

    def _load(self, dtype):
        pass

    def _score(self, images, prompt):
        return torch.tensor([float(np.asarray(im.convert("L"), dtype=np.float64).mean()) for im in images])


def test_best_of_n_keeps_the_top_scored_candidates(tmp_path, tiny_model):
    prompts = _write(tmp_path / "p.txt", ["a red cube"])
    brightness = Brightness()
    out = tmp_path / "best"
    run_batch(prompts, out, Loader(tiny_model),
              _options(best_of=3, verifiers={"brightness": brightness},
                       defaults=ItemDefaults(width=32, height=32, num_images=2)),
              RankInfo())
    record = read_jsonl_records(out / "manifest.jsonl")[0]
    candidates, kept_scores = record["candidate_scores"]["brightness"], record["scores"]["brightness"]
    assert len(candidates) == 6 and record["candidate_seeds"] == [0, 1, 2, 3, 4, 5]
    assert kept_scores == sorted(candidates, reverse=True)[:2]
    kept = [float(brightness.score([Image.open(out / f)], "")[0]) for f in record["files"]]
    assert kept == pytest.approx(kept_scores, abs=1e-4)
    meta = json.loads(Image.open(out / record["files"][0]).text["lumina_mgpt2"])
    assert meta["seed"] == record["seeds"][0] and meta["best_of"] == 3 and meta["prompt"] == "a red cube"


FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


@pytest.mark.slow
def test_geneval_and_dpg_layouts_end_to_end(tmp_path, tiny_model):
    loader = Loader(tiny_model)
    geneval = tmp_path / "geneval"
    options = _options(layout="geneval", defaults=ItemDefaults(width=32, height=32, num_images=2))
    # GenEval's own lines, the first three (each sampling call costs about a second on a shared CPU).
    lines = (FIXTURES / "geneval_metadata_head6.jsonl").read_text().splitlines()[:3]
    metadata = _write(tmp_path / "evaluation_metadata.jsonl", lines)
    summary = run_batch(metadata, geneval, loader, options, RankInfo())
    assert summary.generated == 3 and summary.images == 6
    folders = sorted(p.name for p in geneval.iterdir() if p.is_dir())
    assert folders == ["00000", "00001", "00002"]
    for n, folder in enumerate(folders):
        assert json.loads((geneval / folder / "metadata.jsonl").read_text()) == json.loads(lines[n])
        assert sorted(p.name for p in (geneval / folder / "samples").iterdir()) == ["0000.png", "0001.png"]

    dpg = tmp_path / "dpg"
    options = _options(layout="dpg", defaults=ItemDefaults(width=32, height=32, num_images=4))
    run_batch(FIXTURES / "dpg_bench_head3.jsonl", dpg, loader, options, RankInfo())
    assert sorted(p.name for p in dpg.glob("*.png")) == ["0.png", "1.png", "10.png"]
    assert Image.open(dpg / "10.png").size == (64, 64)
    assert [r["key"] for r in read_jsonl_records(dpg / "manifest.jsonl")] == ["0", "1", "10"]


def test_think_failure_falls_back_to_the_prompt_and_is_recorded(tmp_path, tiny_model):
    from lumina_core.think import ThinkConfig

    prompts = _write(tmp_path / "p.txt", ["a red cube"])
    # A closed loopback port: the endpoint fails at once and the item goes on with the user's prompt.
    think = ThinkConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=5, use_cache=False)
    summary = run_batch(prompts, tmp_path / "o", Loader(tiny_model), _options(think=think), RankInfo())
    assert summary.generated == 1
    record = read_jsonl_records(tmp_path / "o" / "manifest.jsonl")[0]
    assert record["think"]["source"] == "fallback" and record["think"]["prompt"] == "a red cube"
    assert "failed" in record["think"]["warning"] and record["settings"]["think"]["model"] == "m"
