"""Finding weights: local folders, search dirs, unsafe names, offline errors. Never touches the network."""
import json

import pytest

from lumina_core.hub import (
    MOVQGAN_FILE, ModelNotFoundError, missing_model_files, resolve_model, resolve_movqgan, safe_model_name,
)


def _model_folder(path, shards=False):
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text("{}")
    if shards:
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": names[0], "b": names[1]}}))
        for name in names:
            (path / name).write_bytes(b"")
    else:
        (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # Belt and braces: no test may reach the Hub, and no real cache may answer.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_local_folder_and_search_dirs(tmp_path):
    folder = _model_folder(tmp_path / "somewhere" / "my-model")
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder
    models = tmp_path / "models" / "lumina_mgpt2"
    local = _model_folder(models / "Lumina-mGPT-2.0", shards=True)
    # A bare name and the official repo id both find <search dir>/<repo base name>.
    assert resolve_model("Lumina-mGPT-2.0", search_dirs=[tmp_path / "empty", models]) == local
    assert resolve_model("Alpha-VLLM/Lumina-mGPT-2.0", search_dirs=[models], allow_paths=False) == local


def test_incomplete_folder_names_the_missing_files(tmp_path):
    folder = _model_folder(tmp_path / "m", shards=True)
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "tokenizer.json").unlink()
    assert missing_model_files(folder) == ["tokenizer.json", "model-00002-of-00002.safetensors"]
    with pytest.raises(ModelNotFoundError, match=r"incomplete; missing: tokenizer.json, model-00002-of-00002"):
        resolve_model(folder)
    # With auto-download on, a partial copy of a repo is to be completed in place (here: offline, so an error).
    partial = _model_folder(tmp_path / "models" / "Lumina-mGPT-2.0")
    (partial / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=rf"offline(.|\n)*lacks model.safetensors(.|\n)*Place these files in {partial}"):
        resolve_model("Alpha-VLLM/Lumina-mGPT-2.0", search_dirs=[tmp_path / "models"], auto_download=True)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json is missing"):
        resolve_model(tmp_path / "not-a-model")


@pytest.mark.parametrize("name", ["../secret", "/etc", "a/b/c", "a\\b", "..", "models/..", "C:evil", "", " ", "a/.",
                                  "name with spaces", "x" * 200])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ValueError, match="unsafe or invalid model name"):
        safe_model_name(name)


def test_untrusted_input_cannot_use_paths(tmp_path):
    folder = _model_folder(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unsafe or invalid model name"):
        resolve_model(str(folder), search_dirs=[tmp_path / "models"], allow_paths=False)
    with pytest.raises(ValueError, match="unsafe or invalid model name"):
        resolve_model("../elsewhere", search_dirs=[tmp_path / "models"], allow_paths=False)
    assert safe_model_name(" Alpha-VLLM/Lumina-mGPT-2.0 ") == "Alpha-VLLM/Lumina-mGPT-2.0"


def test_offline_error_lists_folders_and_files(tmp_path):
    models = tmp_path / "models" / "lumina_mgpt2"
    extra = tmp_path / "extra"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("Alpha-VLLM/Lumina-mGPT-2.0-Omni", search_dirs=[models, extra], auto_download=True,
                      cache_dir=tmp_path / "hf-cache")
    message = str(info.value)
    assert "offline mode (HF_HUB_OFFLINE)" in message
    for searched in (models / "Lumina-mGPT-2.0-Omni", extra / "Lumina-mGPT-2.0-Omni",
                     models / "Alpha-VLLM" / "Lumina-mGPT-2.0-Omni"):
        assert f"  {searched}" in message
    assert f"Place these files in {models / 'Lumina-mGPT-2.0-Omni'}: config.json, model.safetensors" in message
    assert "tokenizer.json, tokenizer_config.json" in message


def test_without_auto_download_the_error_says_how(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"auto-download is off(.|\n)*https://huggingface.co/Alpha-VLLM/Lumina-mGPT-2.0"):
        resolve_model("Alpha-VLLM/Lumina-mGPT-2.0", search_dirs=[tmp_path], cache_dir=tmp_path / "hf-cache")
    with pytest.raises(ModelNotFoundError, match=r"'my-finetune' not found \(no such folder\)(.|\n)*Known models"):
        resolve_model("my-finetune", search_dirs=[tmp_path])
    # The bare folder name of an official repo points at that repo.
    with pytest.raises(ModelNotFoundError, match=r"'Alpha-VLLM/Lumina-mGPT-2.0-Omni' not found(.|\n)*auto-download"):
        resolve_model("Lumina-mGPT-2.0-Omni", search_dirs=[tmp_path], cache_dir=tmp_path / "hf-cache")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing" / "folder")


def test_movqgan(tmp_path):
    vae_dir = tmp_path / "models" / "lumina_mgpt2"
    vae_dir.mkdir(parents=True)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_movqgan(search_dirs=[vae_dir], auto_download=True, cache_dir=tmp_path / "hf-cache")
    message = str(info.value)
    assert f"  {vae_dir / MOVQGAN_FILE}" in message and f"Place these files in {vae_dir}: {MOVQGAN_FILE}" in message
    (vae_dir / MOVQGAN_FILE).write_bytes(b"")
    assert resolve_movqgan(search_dirs=[vae_dir], allow_paths=False) == vae_dir / MOVQGAN_FILE
    assert resolve_movqgan(vae_dir / MOVQGAN_FILE) == vae_dir / MOVQGAN_FILE
    with pytest.raises(ValueError, match="unsafe"):
        resolve_movqgan("../" + MOVQGAN_FILE, search_dirs=[vae_dir], allow_paths=False)
    with pytest.raises(ModelNotFoundError, match="official file is movqgan_270M.ckpt"):
        resolve_movqgan("other.ckpt", search_dirs=[vae_dir])


def test_verifier_weights_follow_the_model_search_rules(tmp_path, monkeypatch):
    from lumina_core.hub import resolve_weights

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    dirs = [tmp_path / "a", tmp_path / "b"]
    (dirs[1] / "PickScore_v1").mkdir(parents=True)
    (dirs[1] / "head.pth").write_bytes(b"x")
    assert resolve_weights("yuvalkirstain/PickScore_v1", search_dirs=dirs) == dirs[1] / "PickScore_v1"
    assert resolve_weights("owner/repo/head.pth", search_dirs=dirs, file=True) == dirs[1] / "head.pth"
    assert resolve_weights(str(dirs[1] / "head.pth"), file=True) == dirs[1] / "head.pth"   # a path as is
    with pytest.raises(ModelNotFoundError) as info:
        resolve_weights("openai/clip-vit-large-patch14", search_dirs=dirs)
    text = str(info.value)
    # Where it looked, where a download would go (the first search dir, as for models) and how to allow it.
    assert str(dirs[0] / "clip-vit-large-patch14") in text and "auto-download is off" in text
    with pytest.raises(ModelNotFoundError, match="owner/repo/file"):
        resolve_weights("not-a-repo", file=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_weights("openai/clip-vit-large-patch14", search_dirs=dirs, auto_download=True)


@pytest.mark.parametrize("index, says", [
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "'weight_map' must be an object"),  # AttributeError before
    ([1, 2], "'weight_map' must be an object"),  # TypeError before
    ({"weight_map": {"a": {"file": "x"}}}, "must be a file name"),  # TypeError (unhashable) before
])
def test_issue15_item9_malformed_index_is_named_when_looking_for_a_model(tmp_path, index, says):
    from lumina_core.errors import InputError

    folder = _model_folder(tmp_path / "m", shards=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError) as error:
        resolve_model(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder / "model.safetensors.index.json") in message and says in message
