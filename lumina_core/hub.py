"""Finding weights: a local folder, a folder in the caller's search dirs, or a Hugging Face download.

Never imports ComfyUI: the node layer passes ComfyUI's ``models/lumina_mgpt2`` folders as
``search_dirs``. Names coming from workflows are untrusted; ``safe_model_name`` keeps them inside
the search dirs, and callers that handle untrusted input pass ``allow_paths=False``.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence
from .errors import InputError

logger = logging.getLogger(__name__)

OFFICIAL_MODEL_REPOS = ("Alpha-VLLM/Lumina-mGPT-2.0", "Alpha-VLLM/Lumina-mGPT-2.0-Omni")
MOVQGAN_REPO = "ai-forever/MoVQGAN"
MOVQGAN_FILE = "movqgan_270M.ckpt"
# Files fetched from a model repo (no code, no optimizer state).
MODEL_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
# Models shipped inside the package, found by name: the embedded demo (lumina_core.demo.build).
BUILTIN_MODELS = {"demo": Path(__file__).resolve().parent / "assets" / "demo"}
MODEL_FILES_HELP = ("config.json, model.safetensors (or model-0000N-of-0000M.safetensors shards with "
                    "model.safetensors.index.json), tokenizer.json, tokenizer_config.json")

# One or two path segments of safe characters ("name" or "owner/name"), each starting alphanumeric.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_NAME_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")


class ModelNotFoundError(InputError, FileNotFoundError):
    """Weights could not be found or fetched; the message lists where we looked and what to place there."""


def safe_model_name(name: str) -> str:
    """Validate a model name from untrusted input ("name" or "owner/name"); it can never leave its folder."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    cleaned = name.strip()
    if not _NAME_RE.match(cleaned) or any(part in (".", "..") or part.endswith(".") for part in cleaned.split("/")):
        raise ValueError(
            f"unsafe or invalid model name {name!r}: use 'name' or 'owner/name' made of letters, digits, "
            "'.', '_' and '-' (no absolute paths, no '..', no backslashes)"
        )
    return cleaned


def is_repo_id(name: str) -> bool:
    """True for a safe Hugging Face repo id of the form owner/name."""
    try:
        return "/" in safe_model_name(name)
    except ValueError:
        return False


def _folder_name(name: str) -> str:
    """Local folder name for a model: the repo's base name for 'owner/name', else the name."""
    return name.split("/")[-1]


def _offline() -> bool:
    import huggingface_hub.constants as hub_constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in ("1", "true", "yes", "on") or bool(hub_constants.HF_HUB_OFFLINE)


def missing_model_files(folder: str | os.PathLike) -> list[str]:
    """Files a model folder still lacks (empty list = complete)."""
    folder = Path(folder)
    missing = [f for f in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from .weights import read_index  # the one reader of the index: a malformed one is an error naming it

        shards = read_index(folder, check_files=False)
        missing += sorted({p.name for p in shards.values() if not p.is_file()})
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors (or sharded model-*.safetensors + model.safetensors.index.json)")
    return missing


def _candidate_dirs(name: str, search_dirs: Sequence[Path]) -> list[Path]:
    folder = _folder_name(name)
    out = []
    for base in search_dirs:
        out.append(base / folder)
        if "/" in name:
            out.append(base / name)  # models/lumina_mgpt2/Alpha-VLLM/Lumina-mGPT-2.0 also works
    return out


def _not_found(what: str, name: str, searched: Iterable[Path], files: str, reason: str, target: Path | None,
               download_hint: str) -> ModelNotFoundError:
    lines = [f"{what} {name!r} not found ({reason})."]
    searched = list(searched)
    if searched:
        lines.append("Searched:")
        lines += [f"  {p}" for p in searched]
    if target is not None:
        lines.append(f"Place these files in {target}: {files}")
    else:
        lines.append(f"Place these files in a folder and pass its path: {files}")
    lines.append(download_hint)
    return ModelNotFoundError("\n".join(lines))


def _refuse_download_if_off(what: str, name: str, searched: Iterable[Path], files: str, target: Path | None,
                            hint: str, auto_download: bool, *, by_hand: str, reason_detail: str = "") -> None:
    """Raise the not-found error when a download is needed but auto-download is off or HF_HUB_OFFLINE is set."""
    if not auto_download:
        raise _not_found(what, name, searched, files, "not downloaded, auto-download is off", target, hint)
    if _offline():
        raise _not_found(what, name, searched, files,
                         f"offline mode (HF_HUB_OFFLINE) forbids downloading{reason_detail}", target,
                         f"Unset HF_HUB_OFFLINE to download, or {by_hand}.")


def resolve_model(name_or_path: str | os.PathLike, *, search_dirs: Sequence[str | os.PathLike] = (),
                  auto_download: bool = False, allow_paths: bool = True, tqdm_class: Any = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of a transformer checkpoint: local path, ``<search_dir>/<name>``, or HF download.

    ``allow_paths=False`` (untrusted input, e.g. ComfyUI workflows) accepts only safe names.
    Downloads go to ``<search_dirs[0]>/<name>`` when search dirs are given, else the HF cache.
    """
    dirs = [Path(d) for d in search_dirs]
    raw = os.fspath(name_or_path)
    searched: list[Path] = []
    if allow_paths:
        path = Path(raw).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return _checked_model_folder(path)
        if not _NAME_RE.match(raw.strip()):  # a path, not a name
            if path.is_dir():
                raise ModelNotFoundError(f"{path} is not a model folder: config.json is missing "
                                         f"(a checkpoint folder holds {MODEL_FILES_HELP})")
            raise ModelNotFoundError(f"model folder {path} does not exist")
    name = safe_model_name(raw)
    incomplete = ""
    for candidate in _candidate_dirs(name, dirs):
        searched.append(candidate)
        if (candidate / "config.json").is_file():
            missing = missing_model_files(candidate)
            if not missing or not (auto_download and is_repo_id(name)):
                return _checked_model_folder(candidate)
            logger.info("model folder %s is incomplete (missing %s); resuming the download", candidate, missing)
            incomplete = f"; {candidate} lacks {', '.join(missing)}"
            break
    if name in BUILTIN_MODELS and not incomplete:
        builtin = BUILTIN_MODELS[name]
        if not (builtin / "config.json").is_file():
            raise ModelNotFoundError(f"the embedded {name!r} model is missing from {builtin}; rebuild it with "
                                     "`python -m lumina_core.demo.build --out DIR --install`")
        return _checked_model_folder(builtin)
    # A bare official folder name ("Lumina-mGPT-2.0") may be fetched from its repo.
    name = {_folder_name(r): r for r in OFFICIAL_MODEL_REPOS}.get(name, name)
    target = dirs[0] / _folder_name(name) if dirs else None
    if incomplete:
        target = candidate  # finish the partial copy where it is
    hint = (f"Or enable auto-download to fetch it from https://huggingface.co/{name}."
            if is_repo_id(name) else
            f"Known models on Hugging Face: {', '.join(OFFICIAL_MODEL_REPOS)}.")
    if not is_repo_id(name):
        raise _not_found("model", name, searched, MODEL_FILES_HELP, "no such folder", target, hint)

    from huggingface_hub import snapshot_download

    # A complete copy already in the Hugging Face cache is used without network access.
    try:
        folder = Path(snapshot_download(name, allow_patterns=MODEL_ALLOW_PATTERNS, local_files_only=True,
                                        cache_dir=cache_dir))
        if (folder / "config.json").is_file() and not missing_model_files(folder):
            return folder
    except Exception:  # not cached (LocalEntryNotFoundError and friends): fall through
        pass
    _refuse_download_if_off("model", name, searched, MODEL_FILES_HELP, target, hint, auto_download,
                            reason_detail=incomplete, by_hand="copy the files by hand")
    logger.info("downloading %s to %s", name, target or "the Hugging Face cache")
    try:
        folder = Path(snapshot_download(name, allow_patterns=MODEL_ALLOW_PATTERNS,
                                        local_dir=str(target) if target else None, tqdm_class=tqdm_class,
                                        cache_dir=cache_dir))
    except Exception as exc:  # network, auth, missing repo: the same advice applies
        raise _not_found("model", name, searched, MODEL_FILES_HELP, f"download failed: {exc}", target,
                         "Check the network and the repo id, or copy the files by hand.") from exc
    return _checked_model_folder(folder)


def _checked_model_folder(folder: Path) -> Path:
    missing = missing_model_files(folder)
    if missing:
        raise ModelNotFoundError(f"model folder {folder} is incomplete; missing: {', '.join(missing)}")
    return folder


def resolve_movqgan(name_or_path: str | os.PathLike = MOVQGAN_FILE, *, search_dirs: Sequence[str | os.PathLike] = (),
                    auto_download: bool = False, allow_paths: bool = True, tqdm_class: Any = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the MoVQGAN checkpoint: a file path, ``<search_dir>/<name>``, or download from ai-forever/MoVQGAN."""
    dirs = [Path(d) for d in search_dirs]
    raw = os.fspath(name_or_path)
    if allow_paths:
        path = Path(raw).expanduser()
        if path.is_file():
            return path
        if not _NAME_RE.match(raw.strip()):  # a path, not a name
            raise ModelNotFoundError(f"MoVQGAN checkpoint {path} does not exist "
                                     f"(get {MOVQGAN_FILE} from https://huggingface.co/{MOVQGAN_REPO})")
    name = safe_model_name(raw)
    if name != MOVQGAN_FILE:
        for candidate in (d / name for d in dirs):
            if candidate.is_file():
                return candidate
        raise _not_found("MoVQGAN checkpoint", name, [d / name for d in dirs], name, "no such file",
                         dirs[0] if dirs else None,
                         f"The official file is {MOVQGAN_FILE} from https://huggingface.co/{MOVQGAN_REPO}.")
    return resolve_weights(f"{MOVQGAN_REPO}/{MOVQGAN_FILE}", search_dirs=dirs, auto_download=auto_download, file=True,
                           what="MoVQGAN checkpoint", tqdm_class=tqdm_class, cache_dir=cache_dir)


# Files of a verifier's Hugging Face repository: configs, tokenizers, safetensors weights (pickled
# *.bin / *.pth weights are never fetched for transformers models).
VERIFIER_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


def resolve_weights(spec: str, *, search_dirs: Sequence[str | os.PathLike] = (), auto_download: bool = False,
                    file: bool = False, allow_patterns: Sequence[str] = VERIFIER_FILE_PATTERNS,
                    what: str = "verifier model", tqdm_class: Any = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of other weights (verifier models, MoVQGAN): the models' search rules for a folder or a file.

    ``spec`` is a local path, an ``owner/name`` repo (a folder) or, with ``file=True``, an
    ``owner/repo/path/in/repo`` file. Looked up as ``<search_dir>/<name>`` (``<search_dir>/<file name>``),
    then in the Hugging Face cache; downloaded (when allowed) into ``search_dirs[0]``, else the cache.
    """
    dirs = [Path(d) for d in search_dirs]
    path = Path(spec).expanduser()
    if path.is_file() if file else path.is_dir():
        return path
    parts = spec.split("/")
    repo = "/".join(parts[:2])
    inner = "/".join(parts[2:])
    if not is_repo_id(repo) or (file and not inner) or (not file and inner):
        form = "a file or 'owner/repo/file'" if file else "a folder or an 'owner/name' repo id"
        raise ModelNotFoundError(f"{what} not found: {spec!r} (give {form})")
    searched = [d / Path(inner).name for d in dirs] if file else _candidate_dirs(repo, dirs)
    for candidate in searched:
        if candidate.is_file() if file else candidate.is_dir():
            return candidate
    from huggingface_hub import hf_hub_download, snapshot_download

    def fetch(**where: Any) -> Path:
        if file:
            return Path(hf_hub_download(repo, inner, cache_dir=cache_dir, **where))
        return Path(snapshot_download(repo, allow_patterns=list(allow_patterns), cache_dir=cache_dir, **where))

    try:  # a copy already in the Hugging Face cache
        return fetch(local_files_only=True)
    except Exception:  # not cached
        pass
    target = (dirs[0] if file else dirs[0] / _folder_name(repo)) if dirs else None
    files = inner or ", ".join(allow_patterns)
    hint = f"Or enable auto-download (--download, auto_download) to fetch it from https://huggingface.co/{repo}."
    _refuse_download_if_off(what, spec, searched, files, target, hint, auto_download,
                            by_hand=f"run `huggingface-cli download {repo}{' ' + inner if inner else ''}`")
    logger.info("downloading %s to %s", spec, target or "the Hugging Face cache")
    try:
        return fetch(local_dir=str(target) if target else None, tqdm_class=tqdm_class)
    except Exception as exc:
        raise _not_found(what, spec, searched, files, f"download failed: {exc}", target,
                         "Check the network and the repo id, or copy the files by hand.") from exc
