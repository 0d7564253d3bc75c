"""The image-token grammar parser: one image's id sequence -> its code grid, every rule checked.

The sampler never produces an id sequence to parse (it writes codes into a grid); tests use this
to check what the sampler's token stream obeys the grammar of reference section c.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..tokens import LATENT_PER_GRID, TokenLayout


class TokenGrammarError(ValueError):
    """A token sequence or code grid does not follow the Lumina image-token grammar."""


def _describe(layout: TokenLayout, token_id: int) -> str:
    names = {layout.image_start: "image start", layout.image_end: "image end",
             layout.new_line: "new line", layout.separator: "separator", layout.bos: "BOS"}
    if token_id in names:
        return f"{token_id} ({names[token_id]})"
    if layout.is_image_code(token_id):
        return f"{token_id} (image code {token_id - layout.image_code_offset})"
    return str(token_id)


def codes_from_ids(layout: TokenLayout, ids: Sequence[int] | torch.Tensor, require_end: bool = True) -> torch.LongTensor:
    """Parse one image's id sequence (starting at the image start) into its code grid [h, w].

    Validates the whole grammar; errors name what is wrong and the position in ``ids``.
    With ``require_end=False`` a sequence that stops early (no end token) returns the complete
    rows only, e.g. for previews of an unfinished image.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise TokenGrammarError(f"expected a 1-D id sequence, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    if not ids or ids[0] != layout.image_start:
        got = _describe(layout, ids[0]) if ids else "an empty sequence"
        raise TokenGrammarError(f"missing image start at position 0: expected {layout.image_start}, got {got}")
    if len(ids) < 3:
        raise TokenGrammarError(f"sequence ends at position {len(ids)} before the height and width size tokens")
    grids = []
    for pos, what in ((1, "height"), (2, "width")):
        try:
            grids.append(layout.grid_count(ids[pos]))
        except ValueError:
            raise TokenGrammarError(
                f"unknown {what} size token at position {pos}: {_describe(layout, ids[pos])} is not a size token"
            ) from None
    rows, cols = grids[0] * LATENT_PER_GRID, grids[1] * LATENT_PER_GRID
    body_start, row_len = 3, cols + 1
    codes: list[list[int]] = []
    for r in range(rows):
        row_pos = body_start + r * row_len
        row = ids[row_pos:row_pos + row_len]
        for c, token_id in enumerate(row[:cols]):
            if not layout.is_image_code(token_id):
                what = "row too short" if token_id in (layout.new_line, layout.image_end) else "non-image id"
                raise TokenGrammarError(
                    f"{what} at position {row_pos + c} (row {r}, column {c}): expected an image code "
                    f"({cols} per row), got {_describe(layout, token_id)}"
                )
        if len(row) < row_len:
            if require_end:
                raise TokenGrammarError(
                    f"sequence ends at position {len(ids)} inside row {r} of {rows} ({len(row)} of {row_len} "
                    "tokens incl. the new line); missing image end"
                )
            break
        if row[cols] != layout.new_line:
            what = "row too long" if layout.is_image_code(row[cols]) else "missing new line"
            raise TokenGrammarError(
                f"{what} at position {row_pos + cols} (end of row {r}): expected the new line "
                f"{layout.new_line}, got {_describe(layout, row[cols])}"
            )
        codes.append([t - layout.image_code_offset for t in row[:cols]])
    end_pos = body_start + rows * row_len
    if len(codes) == rows:
        if end_pos >= len(ids):
            if require_end:
                raise TokenGrammarError(f"missing image end at position {end_pos}: sequence ends after the last row")
        elif ids[end_pos] != layout.image_end:
            raise TokenGrammarError(f"missing image end at position {end_pos}: expected {layout.image_end}, "
                                    f"got {_describe(layout, ids[end_pos])}")
        elif end_pos + 1 != len(ids):
            raise TokenGrammarError(f"{len(ids) - end_pos - 1} unexpected tokens after the image end "
                                    f"(position {end_pos + 1} on)")
    return torch.tensor(codes, dtype=torch.long).reshape(len(codes), cols)


