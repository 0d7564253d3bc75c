"""Reading an LLM answer: the refined prompt between <results> markers, and the reasoning around it."""
from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think(?:ing)?>(.*?)</think(?:ing)?>", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.IGNORECASE)
_RESULTS_OPEN = re.compile(r"<\s*results?\s*>", re.IGNORECASE)
_RESULTS_CLOSE = re.compile(r"<\s*/\s*results?\s*>", re.IGNORECASE)
_FINAL_LABEL = re.compile(r"(?:final|refined|improved|rewritten)\s+prompt\s*[:：]", re.IGNORECASE)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _clean_prompt(text: str) -> str:
    text = _FENCE.sub("", text.strip()).strip()
    text = text.strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”`":
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == "“" and text[-1] == "”":
        text = text[1:-1].strip()
    return " ".join(text.split())


def parse_refinement(answer: str) -> tuple[str | None, str]:
    """Split an LLM answer into (refined prompt or None when none was found, reasoning text)."""
    answer = answer or ""
    thoughts = [m.strip() for m in _THINK_BLOCK.findall(answer)]
    body = _THINK_BLOCK.sub("", answer)
    # Some servers strip the opening <think> tag: everything before a lone closing tag is thinking.
    close = None
    for close in _THINK_CLOSE.finditer(body):
        pass
    if close is not None:
        thoughts.append(body[: close.start()].strip())
        body = body[close.end():]

    opens = list(_RESULTS_OPEN.finditer(body))
    refined: str | None = None
    analysis = body
    if opens:
        last = opens[-1]
        end = _RESULTS_CLOSE.search(body, last.end())
        inside = body[last.end(): end.start() if end else len(body)]
        refined = _clean_prompt(inside) or None
        analysis = body[: last.start()]
    else:
        labels = list(_FINAL_LABEL.finditer(body))
        if labels:
            tail = body[labels[-1].end():].strip()
            paragraph = re.split(r"\n\s*\n", tail, maxsplit=1)[0]
            refined = _clean_prompt(paragraph) or None
            analysis = body[: labels[-1].start()]
    reasoning = "\n\n".join([t for t in thoughts if t] + ([analysis.strip()] if analysis.strip() else []))
    return refined, reasoning
