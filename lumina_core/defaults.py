"""``ModelDefaults``: a model's own settings (size per task, cfg, guidance, top-k, the tasks it knows).

They travel with the model: a model folder may hold ``sampling_defaults.json`` (the embedded demo
and ``train export`` of a fine-tune write one); without it the official defaults apply. The pipe
carries the object (``pipe.defaults``) so the nodes and the CLI resolve every "model default" from
one place, and an explicit value always wins over it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import InputError
from .sampling import GUIDANCE_MODES
from .tasks import TASKS, get_task

DEFAULTS_FILE = "sampling_defaults.json"
# The official generate.py settings: what a model folder without sampling_defaults.json gets.
OFFICIAL_CFG = 4.0
OFFICIAL_GUIDANCE = "official"
OFFICIAL_TOP_K = 4096


class DefaultsFileError(InputError):
    """A sampling_defaults.json that cannot be used (the message names the file and the field)."""


def _official_sizes() -> dict[str, tuple[int, int]]:
    return {key: (spec.default_width, spec.default_height) for key, spec in TASKS.items()}


@dataclass(frozen=True)
class ModelDefaults:
    """A model's settings: the size it was trained on per task, sampling values, and the tasks it knows."""

    sizes: Mapping[str, tuple[int, int]] = field(default_factory=_official_sizes)
    cfg: float = OFFICIAL_CFG
    guidance: str = OFFICIAL_GUIDANCE
    top_k: int = OFFICIAL_TOP_K
    tasks: tuple[str, ...] = tuple(TASKS)
    source: str = "the official defaults"   # where these came from, for messages

    @classmethod
    def official(cls) -> "ModelDefaults":
        """The official release's settings (every task, 768x768 / 512x1024, cfg 4, official guidance, top-k 4096)."""
        return cls()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelDefaults":
        """The folder's sampling_defaults.json, else the official defaults."""
        path = Path(folder) / DEFAULTS_FILE
        if not path.is_file():
            return cls.official()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DefaultsFileError(f"{path}: not readable JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "sampling_defaults.json") -> "ModelDefaults":
        """Build from the JSON form; unknown tasks, bad sizes and bad values raise naming the source and field."""
        if not isinstance(data, Mapping):
            raise DefaultsFileError(f"{source}: expected a JSON object, got {type(data).__name__}")

        def bad(name: str, why: str) -> DefaultsFileError:
            return DefaultsFileError(f"{source}: {name} {why}")

        tasks = data.get("tasks", list(TASKS))
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise bad("tasks", "must be a non-empty list of task names")
        for task in tasks:
            if task not in TASKS:
                raise bad("tasks", f"names the unknown task {task!r}; known: {sorted(TASKS)}")
        official = _official_sizes()
        sizes = dict(official)
        base = data.get("width"), data.get("height")
        if base != (None, None):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in base):
                raise bad("width/height", f"must be positive integers, got {list(base)}")
            # One panel size for every task the file does not size itself (dual panels stack two).
            sizes = {key: (base[0], 2 * base[1] if get_task(key).dual_panel else base[1]) for key in TASKS}
        for task, size in (data.get("sizes") or {}).items():
            if task not in TASKS:
                raise bad("sizes", f"names the unknown task {task!r}")
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
                raise bad(f"sizes.{task}", f"must be [width, height] in pixels, got {size!r}")
            sizes[task] = (size[0], size[1])
        cfg = data.get("cfg", OFFICIAL_CFG)
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or cfg < 1.0:
            raise bad("cfg", f"must be a number >= 1, got {cfg!r}")
        guidance = data.get("guidance", OFFICIAL_GUIDANCE)
        if guidance not in GUIDANCE_MODES:
            raise bad("guidance", f"must be one of {list(GUIDANCE_MODES)}, got {guidance!r}")
        top_k = data.get("top_k", OFFICIAL_TOP_K)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise bad("top_k", f"must be a positive integer, got {top_k!r}")
        return cls(sizes=sizes, cfg=float(cfg), guidance=guidance, top_k=top_k, tasks=tuple(tasks), source=source)

    def to_dict(self) -> dict:
        """The JSON form (what sampling_defaults.json holds; what the web extension receives)."""
        return {"tasks": list(self.tasks), "sizes": {k: list(v) for k, v in self.sizes.items()},
                "cfg": self.cfg, "guidance": self.guidance, "top_k": self.top_k}

    def write(self, folder: str | Path) -> Path:
        """Write sampling_defaults.json into ``folder`` (atomically); return its path."""
        from .fileio import atomic_write_text

        path = Path(folder) / DEFAULTS_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    # --- resolution: explicit values win, None means "the model's default" ----------------------
    def size(self, task: str, width: Optional[int] = None, height: Optional[int] = None) -> tuple[int, int]:
        """(width, height) for ``task``: the given values, the other one from the model's size for the task."""
        get_task(task)  # unknown tasks raise with the allowed list
        default_w, default_h = self.sizes[task]
        return (width or default_w, height or default_h)

    def sampling(self, cfg: Optional[float] = None, guidance: Optional[str] = None,
                 top_k: Optional[int] = None) -> dict:
        """{cfg, guidance, top_k}: each given value, else the model's."""
        return {"cfg": self.cfg if cfg is None else cfg, "guidance": guidance or self.guidance,
                "top_k": self.top_k if top_k is None else top_k}

    def knows(self, task: str) -> bool:
        """True when the model lists ``task`` among the tasks it was trained for."""
        return task in self.tasks

    def task_warning(self, task: str) -> Optional[str]:
        """A warning for a task the model does not list (naming the ones it knows), or None."""
        if self.knows(task):
            return None
        return (f"warning: this model lists only the tasks {', '.join(self.tasks)} ({self.source}); "
                f"{task!r} will run but was not trained, so expect noise")
