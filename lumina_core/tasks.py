"""The task catalogue as data: prompt templates, panel layout and default size of every task.

Templates use the placeholders ``{w}`` and ``{h}`` (the FULL output image; for dual-panel tasks
both panels), ``{prompt}`` (the user's text) and, for the paper's subject form, ``{subject}``.

Two template families:
- ``official``: the strings of the official generate.py (reference section d), copied verbatim
  (ASCII ``x`` between width and height). These are what the released checkpoint was trained and
  demonstrated with; they are the default.
- ``paper``: the forms of the paper's Table 3 (arXiv 2507.17801), which write ``×``. Only the
  subject-driven row is known verbatim (quoted in official issue #24); the other rows were not
  retrievable, so those forms are OURS, written in the same style, and marked as such below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

TEMPLATE_KINDS = ("official", "paper")

# --- official strings (generate.py; reference section d), verbatim --------------------------
OFFICIAL_T2I = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"
# Image-pair generation from text: the lower half shows the condition map.
_OFFICIAL_PAIR = ("Generate a dual-panel image of {{w}}x{{h}} where the <lower half> displays a <{cond}>, "
                  "while the <upper half> retains the original image for direct visual comparison:\n{{prompt}}")
# Image-to-image: the given upper half shows the condition, the model paints the lower half.
_OFFICIAL_I2I = ("Generate a dual-panel image of {{w}}x{{h}} where the <upper half> displays a <{cond}>, "
                 "while the <lower half> retains the original image for direct visual comparison:\n{{prompt}}")
# generate.py fills the subject task's condition slot with this fixed sentence, literally.
OFFICIAL_SUBJECT_CONDITION = "Bubbly and effervescent with a sparkling allure."

# Condition names as generate.py writes them.
CONDITION_NAMES = {
    "depth": "depth map",
    "canny": "canny edge map",
    "hed": "hed edge map",
    "pose": "pose estimation map",
}

# --- paper (Table 3) forms --------------------------------------------------------------------
# Verbatim from the paper (via official issue #24); {subject} = the object description.
PAPER_SUBJECT = ("Generate a dual-panel image of {w}×{h} where the <upper half> displays: {subject}, while the "
                 "<lower half> shows the image according to the object and following prompt: {prompt}.")
# OURS (the Table 3 row was not retrievable): the official T2I string with the paper's ×.
PAPER_T2I = "Generate an image of {w}×{h} according to the following prompt:\n{prompt}"
# OURS: pair generation in the paper's style.
_PAPER_PAIR = ("Generate a dual-panel image of {{w}}×{{h}} where the <lower half> displays a <{cond}>, "
               "while the <upper half> retains the original image for direct visual comparison:\n{{prompt}}")
# OURS: editing (no official string exists either).
PAPER_EDIT = ("Generate a dual-panel image of {w}×{h} where the <upper half> displays the original image, "
              "while the <lower half> shows the image edited according to the following instruction: {prompt}")
# OURS: controllable generation in the paper's style.
_PAPER_CONTROL = ("Generate a dual-panel image of {{w}}×{{h}} where the <upper half> displays a <{cond}>, "
                  "while the <lower half> shows the image generated from it according to the following "
                  "prompt: {{prompt}}")
# OURS: dense prediction (no official string: generate.py has no dense-prediction task).
_PAPER_DENSE = ("Generate a dual-panel image of {{w}}×{{h}} where the <upper half> displays the original "
                "image, while the <lower half> shows its <{cond}>: {{prompt}}")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its templates, whether a reference fills the upper panel, and its default size."""

    key: str
    display_name: str
    templates: Mapping[str, str]          # kind ("official" | "paper") -> template
    dual_panel: bool                      # output is one W x H image made of two W x H/2 panels
    reference_upper: bool                 # the upper panel is given (I2I); else the whole image is generated
    default_width: int
    default_height: int
    condition: str | None = None          # condition-map name, for pair/control/dense tasks
    needs_subject: bool = field(default=False)  # paper form takes an object description

    @property
    def official_template(self) -> str | None:
        """The verbatim official template, or None when the official code has none for this task."""
        return self.templates.get("official")

    @property
    def paper_template(self) -> str:
        """The paper-style (Table 3) template."""
        return self.templates["paper"]

    def template(self, kind: str = "official") -> str:
        """Template of the given kind; 'official' falls back to 'paper' when no official string exists."""
        if kind not in TEMPLATE_KINDS:
            raise ValueError(f"unknown template {kind!r} for task {self.key!r}; allowed: {list(TEMPLATE_KINDS)}")
        if kind == "official" and "official" not in self.templates:
            # The official code has no string for this task: the paper-style form is its only form.
            return self.templates["paper"]
        return self.templates[kind]


def _pair(cond: str) -> TaskSpec:
    name = CONDITION_NAMES[cond]
    # The official pair list names the pose task "openpose".
    key = "pair_openpose" if cond == "pose" else f"pair_{cond}"
    return TaskSpec(
        key=key, display_name=f"Image + {name} pair from text",
        templates={"official": _OFFICIAL_PAIR.format(cond=name), "paper": _PAPER_PAIR.format(cond=name)},
        dual_panel=True, reference_upper=False, default_width=512, default_height=1024, condition=name,
    )


def _control(cond: str) -> TaskSpec:
    name = CONDITION_NAMES[cond]
    # generate.py runs this template for depth and canny; hed/pose use the same template with the
    # condition names of the official pair task list.
    return TaskSpec(
        key=f"control_{cond}", display_name=f"Controllable generation from a {name}",
        templates={"official": _OFFICIAL_I2I.format(cond=name), "paper": _PAPER_CONTROL.format(cond=name)},
        dual_panel=True, reference_upper=True, default_width=512, default_height=1024, condition=name,
    )


def _dense(cond: str) -> TaskSpec:
    name = CONDITION_NAMES[cond]
    # No official dense-prediction string exists. The official PAIR template describes exactly this
    # layout (original image above, condition map below) and the checkpoint was trained on it, so
    # it serves as the "official" form here with the upper panel given instead of sampled.
    return TaskSpec(
        key=f"dense_{cond}", display_name=f"Dense prediction: {name}",
        templates={"official": _OFFICIAL_PAIR.format(cond=name), "paper": _PAPER_DENSE.format(cond=name)},
        dual_panel=True, reference_upper=True, default_width=512, default_height=1024, condition=name,
    )


def _catalogue() -> dict[str, TaskSpec]:
    tasks = [
        TaskSpec(key="t2i", display_name="Text to image",
                 templates={"official": OFFICIAL_T2I, "paper": PAPER_T2I},
                 dual_panel=False, reference_upper=False, default_width=768, default_height=768),
        *(_pair(c) for c in ("depth", "canny", "hed", "pose")),
        TaskSpec(key="subject", display_name="Subject-driven generation",
                 templates={"official": _OFFICIAL_I2I.format(cond=OFFICIAL_SUBJECT_CONDITION),
                            "paper": PAPER_SUBJECT},
                 dual_panel=True, reference_upper=True, default_width=512, default_height=1024,
                 needs_subject=True),
        TaskSpec(key="edit", display_name="Image editing", templates={"paper": PAPER_EDIT},
                 dual_panel=True, reference_upper=True, default_width=512, default_height=1024),
        *(_control(c) for c in ("canny", "depth", "pose", "hed")),
        *(_dense(c) for c in ("depth", "canny", "hed", "pose")),
    ]
    return {t.key: t for t in tasks}


TASKS: Mapping[str, TaskSpec] = _catalogue()


def get_task(key: str) -> TaskSpec:
    """Look up a task by key; unknown keys raise with the list of allowed keys."""
    try:
        return TASKS[key]
    except KeyError:
        raise ValueError(f"unknown task {key!r}; allowed: {sorted(TASKS)}") from None
