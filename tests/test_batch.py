"""Batch generation without a model: prompt files, sharding, layouts, atomic manifests, merge and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lumina_core.batchgen import (BatchItem, ItemDefaults, PromptFileError, grid_image, is_done, layout_paths,
                               merge_manifests, pairs_index_records, parse_prompt_file, rank_manifest_path,
                               read_manifest, shard, write_item_outputs, write_jsonl_atomic)

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
GENEVAL = FIXTURES / "geneval_metadata_head6.jsonl"
DPG = FIXTURES / "dpg_bench_head3.jsonl"


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _colour_images(n: int, size=(32, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * k, 255 - 40 * k, 7 * k)) for k in range(n)]


def test_text_file_one_prompt_a_line_blank_lines_take_no_index(tmp_path):
    path = _write(tmp_path / "prompts.txt", ["a red cube", "", "  a blue ball  ", "{not json in a text file}"])
    items, bad = parse_prompt_file(path, ItemDefaults(width=64, height=32, seed=100, num_images=2))
    assert bad == []
    assert [(i.line, i.index, i.key, i.prompt) for i in items] == [
        (1, 0, "00000", "a red cube"), (3, 1, "00001", "a blue ball"), (4, 2, "00002", "{not json in a text file}")]
    assert [i.seed for i in items] == [100, 1100, 2100]  # run seed + index x 1000: no image seed repeats
    assert all((i.width, i.height, i.num_images, i.task) == (64, 32, 2, "t2i") for i in items)


def test_jsonl_fields_and_extras_kept(tmp_path):
    ref = tmp_path / "refs" / "cat.png"
    ref.parent.mkdir()
    Image.new("RGB", (40, 30)).save(ref)
    path = _write(tmp_path / "items.jsonl", [
        {"prompt": "a fox", "size": "64x32", "seed": 7, "images": 3, "tag": "animals", "include": [1, 2]},
        {"prompt": "edges", "task": "control_canny", "reference": "refs/cat.png", "width": 32, "height": 64,
         "id": "cat-1"},
        {"prompt": "square", "size": 96},
    ])
    items, bad = parse_prompt_file(path, ItemDefaults(width=32, height=32))
    assert bad == []
    fox, cat, square = items
    assert (fox.width, fox.height, fox.seed, fox.num_images) == (64, 32, 7, 3)
    assert fox.extra == {"tag": "animals", "include": [1, 2]}
    assert fox.source["tag"] == "animals" and fox.source["prompt"] == "a fox"
    assert cat.key == "cat-1" and cat.task == "control_canny" and cat.reference == str(ref.resolve())
    assert cat.request(reference=Image.open(ref)).is_dual_panel
    assert (square.width, square.height, square.seed) == (96, 96, 2000)


def test_bad_lines_reported_with_numbers_and_skipped(tmp_path):
    path = _write(tmp_path / "items.jsonl", [
        {"prompt": "fine"},
        '{"prompt": "broken", ',                                          # malformed JSON
        {"prompt": "needs ref", "task": "control_depth", "reference": "missing.png", "size": "64x64"},
        {"prompt": "off grid", "size": "100x64"},                        # 100 is not a multiple of 32
        {"prompt": "no ref", "task": "edit", "size": "64x64"},          # I2I task without a reference
        {"task": "t2i"},                                                  # no prompt
        {"prompt": "bad seed", "seed": -1},
        {"prompt": "dup", "id": "x"},
        {"prompt": "dup again", "id": "x"},
        {"prompt": "unknown task", "task": "paint"},
        '["a list"]',
        {"prompt": "last is fine"},
    ])
    items, bad = parse_prompt_file(path, ItemDefaults(width=64, height=64))
    assert [i.line for i in items] == [1, 8, 12]
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 9, 10, 11]
    assert "malformed JSON" in reasons[2]
    assert "reference image not found" in reasons[3] and "missing.png" in reasons[3]
    assert "100" in reasons[4] and "multiple of 32" in reasons[4]
    assert "needs a reference" in reasons[5]
    assert "prompt" in reasons[6]
    assert "seed" in reasons[7]
    assert "duplicate id 'x'" in reasons[9] and "line 8" in reasons[9]
    assert "unknown task" in reasons[10]
    assert "JSON object" in reasons[11]
    # Bad lines keep their index, so later items keep the indices of their lines.
    assert [i.index for i in items] == [0, 7, 11]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        parse_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(PromptFileError, match="no prompts"):
        parse_prompt_file(_write(tmp_path / "empty.txt", ["", "  "]))
    with pytest.raises(ValueError, match="unknown layout"):
        parse_prompt_file(_write(tmp_path / "a.txt", ["x"]), layout="zip")


def test_pairs_layout_needs_dual_panel_tasks(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a room", "task": "pair_depth", "size": "32x64"},
                                          {"prompt": "just an image", "size": "32x32"}])
    items, bad = parse_prompt_file(path, layout="pairs")
    assert [i.line for i in items] == [1]
    assert bad[0].line == 2 and "dual-panel" in bad[0].reason


def test_shard_is_disjoint_complete_and_rank_independent():
    items = [BatchItem(line=n + 1, index=n, key=f"{n:05d}", prompt="p", task="t2i", width=32, height=32,
                       seed=n, num_images=1) for n in range(20)]
    for world in (1, 2, 3, 8):
        shards = [shard(items, r, world) for r in range(world)]
        keys = [i.key for s in shards for i in s]
        assert sorted(keys) == [i.key for i in items] and len(keys) == len(set(keys))
    # The seed travels with the item, whichever rank draws it.
    assert {i.key: i.seed for i in shard(items, 1, 2)} == {i.key: i.seed for i in items[1::2]}
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def test_geneval_real_metadata_slice_gives_the_scorer_tree(tmp_path):
    items, bad = parse_prompt_file(GENEVAL, ItemDefaults(num_images=4), layout="geneval")
    assert bad == [] and len(items) == 6
    originals = GENEVAL.read_text().splitlines()
    for item in items:
        files = write_item_outputs("geneval", tmp_path, item, _colour_images(4))
        folder = tmp_path / f"{item.index:05d}"
        assert files[0] == f"{item.index:05d}/metadata.jsonl"
        # GenEval's scorer json.load()s the file: the prompt's metadata object, unchanged.
        with open(folder / "metadata.jsonl") as handle:
            assert json.load(handle) == json.loads(originals[item.index])
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png",
                                                                         "0003.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n:05d}" for n in range(6)]
    assert items[0].extra == {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}


def test_dpg_ids_map_to_2x2_grid_files(tmp_path):
    items, bad = parse_prompt_file(DPG, ItemDefaults(width=32, height=32, num_images=4), layout="dpg")
    assert bad == [] and [i.key for i in items] == ["0", "1", "10"]
    images = _colour_images(4)
    for item in items:
        assert write_item_outputs("dpg", tmp_path, item, images) == [f"{item.key}.png"]
    grid = Image.open(tmp_path / "10.png")
    assert grid.size == (64, 64)
    # DPG-Bench crops (0,0), (r,0), (0,r), (r,r): image n sits at column n % 2, row n // 2.
    for n, (x, y) in enumerate([(0, 0), (32, 0), (0, 32), (32, 32)]):
        assert grid.crop((x, y, x + 32, y + 32)).tobytes() == images[n].tobytes()
    assert grid_image(_colour_images(3)).size == (64, 64)


def test_pairs_layout_splits_panels_and_index_reads_as_training_items(tmp_path):
    item = BatchItem(line=1, index=0, key="room", prompt="a room", task="pair_depth", width=32, height=64,
                     seed=3, num_images=2)
    top = Image.new("RGB", (32, 32), (255, 0, 0))
    bottom = Image.new("RGB", (32, 32), (0, 0, 255))
    full = Image.new("RGB", (32, 64))
    full.paste(top, (0, 0))
    full.paste(bottom, (0, 32))
    files = write_item_outputs("pairs", tmp_path, item, [full, full])
    assert files == ["upper/room_0.png", "lower/room_0.png", "upper/room_1.png", "lower/room_1.png"]
    assert Image.open(tmp_path / files[0]).tobytes() == top.tobytes()
    assert Image.open(tmp_path / files[1]).tobytes() == bottom.tobytes()
    record = {"key": "room", "index": 0, "status": "ok", "task": "pair_depth", "prompt": "a room", "width": 32,
              "height": 64, "files": files, "seeds": [3, 4]}
    pairs = pairs_index_records([record, {"key": "bad", "status": "failed"}])
    assert [p["id"] for p in pairs] == ["room_0", "room_1"]
    assert pairs[1]["image"] == "upper/room_1.png" and pairs[1]["second_image"] == "lower/room_1.png"
    from lumina_core.train.data import parse_item
    parsed = parse_item(pairs[0], tmp_path, 0)
    assert parsed.second_image == str(tmp_path / "lower/room_0.png") and (parsed.width, parsed.height) == (32, 64)


def test_layout_paths_match_written_files(tmp_path):
    item = BatchItem(line=1, index=3, key="k", prompt="p", task="t2i", width=32, height=32, seed=0, num_images=2)
    for layout in ("plain", "geneval", "dpg"):
        written = write_item_outputs(layout, tmp_path / layout, item, _colour_images(2))
        assert written == layout_paths(layout, item, 2)
        assert all((tmp_path / layout / rel).is_file() for rel in written)


def test_manifest_merge_dedups_prefers_success_and_resume_checks_files(tmp_path):
    (tmp_path / "a_0.png").write_bytes(b"x")
    ok_a = {"key": "a", "index": 0, "status": "ok", "fingerprint": "f", "files": ["a_0.png"],
            "finished_at": "2025-01-01T00:00:02"}
    failed_b = {"key": "b", "index": 1, "status": "failed", "reason": "boom", "finished_at": "2025-01-01T00:00:01"}
    old_a = dict(ok_a, finished_at="2025-01-01T00:00:00", fingerprint="old")
    write_jsonl_atomic(tmp_path / "manifest.jsonl", [old_a])
    write_jsonl_atomic(rank_manifest_path(tmp_path, 1), [failed_b, ok_a])
    # A torn line (hand edit, foreign writer) is skipped, never fatal.
    with open(rank_manifest_path(tmp_path, 0), "w") as handle:
        handle.write(json.dumps(dict(failed_b, key="a", finished_at="2025-01-01T00:00:09")) + "\n{\"key\": \"c")
    merged = read_manifest(tmp_path)
    assert merged["a"]["fingerprint"] == "f"   # success beats a later failure; newer success beats older
    records = merge_manifests(tmp_path, "plain")
    assert [r["key"] for r in records] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_0.png", "manifest.jsonl"]
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b"]
    assert is_done(merged["a"], "f", tmp_path)
    assert not is_done(merged["a"], "other settings", tmp_path)
    assert not is_done(merged["b"], merged["b"].get("fingerprint", ""), tmp_path)
    (tmp_path / "a_0.png").unlink()
    assert not is_done(merged["a"], "f", tmp_path)   # a deleted image is regenerated


def test_cli_batch_argument_errors(tmp_path, capsys):
    from lumina_core.__main__ import main

    prompts = _write(tmp_path / "p.txt", ["a red cube"])
    base = ["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts), "--output",
            str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--best-of", "2"])
    assert exit_info.value.code == 2 and "--verifier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--reference", str(prompts)])
    assert exit_info.value.code == 2 and "per item" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "m"])
    assert exit_info.value.code == 2 and "--prompts FILE" in capsys.readouterr().err
