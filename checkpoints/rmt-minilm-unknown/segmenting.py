"""Split a batch of tokenized documents into aligned segments.

Every document is tokenized once by the backbone's tokenizer (`[CLS] content [SEP]` for encoders,
plain tokens for decoders; padded either side). The outer special tokens are stripped and the
content is cut into segments of `segment_size` tokens. For classification all documents end at the
same step (a shorter one starts later and keeps its memory untouched until then); for language
modelling all documents start together, each cut from its own first token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Segment:
    """The content of one step for the documents that have tokens in it (its `rows`)."""

    rows: torch.Tensor  # [A] indices of the active documents in the batch
    first_column: torch.Tensor  # [A] column of input_ids holding each row's first token of this segment
    input_ids: torch.Tensor  # [A, n] content left-packed, padded with pad_token_id
    attention_mask: torch.Tensor  # [A, n] 1 on content
    token_type_ids: torch.Tensor | None  # [A, n] or None


@dataclass
class SegmentPlan:
    """Where each document's content lies in the input and on the common grid of segments.

    Nothing of the document's length is copied: each step gathers its `segment_size` tokens straight
    from the input, so planning a 2M-token document costs a few bytes per document.
    """

    input_ids: torch.Tensor  # [B, L] the input (or its compacted copy when the mask has holes)
    token_type_ids: torch.Tensor | None
    content_start: torch.Tensor  # [B] index in input_ids of each document's first content token
    lengths: torch.Tensor  # [B] content tokens per document
    grid_offset: torch.Tensor  # [B] grid position of each document's first content token
    segments_per_document: torch.Tensor  # [B]
    segment_size: int
    pad_token_id: int
    compacted: bool = False  # the attention mask had holes: input_ids is a compacted copy

    @property
    def num_segments(self) -> int:
        return int(self.segments_per_document.max()) if self.segments_per_document.numel() else 0

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def active_mask(self) -> torch.Tensor:
        """[B, T] bool: which documents have content at each step."""
        steps = torch.arange(self.num_segments, device=self.input_ids.device)[None, :]
        first_step = (self.grid_offset // self.segment_size)[:, None]
        return (steps >= first_step) & (steps < first_step + self.segments_per_document[:, None])

    def without_last_segments(self) -> SegmentPlan:
        """The same documents minus each one's last segment (the rest of a prompt before generation).

        Only for plans whose documents start together (alignment "start")."""
        lengths = (self.segments_per_document - 1) * self.segment_size
        return replace(self, lengths=lengths, segments_per_document=self.segments_per_document - 1)

    def segment(self, step: int) -> Segment:
        """The content of step `step`, left-packed, for the documents active at that step."""
        window_start = step * self.segment_size - self.grid_offset
        begin = window_start.clamp(min=0)
        end = torch.minimum(window_start + self.segment_size, self.lengths)
        rows = (end > begin).nonzero().squeeze(1)
        counts = (end - begin)[rows]
        width = int(counts.max())
        columns = torch.arange(width, device=self.input_ids.device)
        mask = columns[None, :] < counts[:, None]
        index = (self.content_start[rows] + begin[rows])[:, None] + columns[None, :]  # in the compacted input
        index = torch.where(mask, index, self.content_start[rows, None])  # any valid column where masked
        ids = self.input_ids[rows[:, None], index].masked_fill(~mask, self.pad_token_id)
        types = None if self.token_type_ids is None else self.token_type_ids[rows[:, None], index] * mask
        first_column = self.content_start[rows] + begin[rows]
        return Segment(rows, first_column, input_ids=ids, attention_mask=mask.long(), token_type_ids=types)


def _compact(tensor: torch.Tensor | None, real: torch.Tensor, fill: int) -> torch.Tensor | None:
    """Move each row's real tokens to its front, in order (only for masks with holes)."""
    if tensor is None:
        return None
    out = torch.full_like(tensor, fill)
    for row in range(tensor.shape[0]):
        kept = tensor[row][real[row]]
        out[row, : kept.numel()] = kept
    return out


def plan_segments(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    *,
    segment_size: int,
    cls_token_id: int | None,
    sep_token_id: int | None,
    pad_token_id: int | None,
    alignment: str = "right",
    padding_needs_mask: bool = True,
    vocab_size: int | None = None,
) -> SegmentPlan:
    """Strip the tokenizer's outer [CLS]/[SEP] and place every document's content on the segment grid.

    `padding_needs_mask=False` accepts pad tokens without an attention mask (decoders whose pad token
    is also their end-of-text token). With `vocab_size`, every id (padding too) must be in [0, vocab_size).
    Raises ValueError for inputs that cannot be segmented faithfully.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids of shape {tuple(input_ids.shape)} hold no tokens: pass at least one document with text."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if vocab_size is not None:
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(outside.any()):
            row, column = outside.nonzero()[0].tolist()
            raise ValueError(
                f"input_ids[{row}, {column}] is {int(input_ids[row, column])}, outside the backbone's vocabulary of "
                f"{vocab_size} tokens (ids 0..{vocab_size - 1}): encode the text with the model's own tokenizer, "
                "and pad with its pad_token_id."
            )
    if attention_mask is None:
        if padding_needs_mask and pad_token_id is not None and bool((input_ids == pad_token_id).any()):
            raise ValueError(
                "input_ids contain padding (pad_token_id) but no attention_mask was given; pass the "
                "attention_mask the tokenizer returns so padding is not read as text."
            )
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}."
        )
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"token_type_ids shape {tuple(token_type_ids.shape)} differs from input_ids {tuple(input_ids.shape)}."
        )
    fill = pad_token_id if pad_token_id is not None else 0
    real = attention_mask.bool()
    length = input_ids.shape[1]
    count = real.sum(dim=1)
    first = real.to(torch.uint8).argmax(dim=1)
    last = length - 1 - real.flip(1).to(torch.uint8).argmax(dim=1)
    if bool(((last - first + 1) != count)[count > 0].any()):  # holes inside a document: close them
        input_ids = _compact(input_ids, real, fill)
        token_type_ids = _compact(token_type_ids, real, 0)
        first, last = torch.zeros_like(first), count - 1
        compacted = True
    else:
        compacted = False
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    has_cls = torch.zeros_like(count, dtype=torch.bool)
    if cls_token_id is not None:
        has_cls = (count > 0) & (input_ids[rows, first] == cls_token_id)
    content_start = first + has_cls.long()
    has_sep = torch.zeros_like(has_cls)
    if sep_token_id is not None:
        has_sep = (last >= content_start) & (input_ids[rows, last] == sep_token_id)
    lengths = (last + 1 - has_sep.long() - content_start).clamp(min=0) * (count > 0)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Document(s) at batch index {empty} have no tokens besides special tokens and padding; "
            "remove empty documents before calling the model."
        )
    segments = (lengths + segment_size - 1) // segment_size
    total = int(segments.max()) * segment_size
    # "right"/"left": documents end together on the last step, with a short first ("right") or last
    # ("left") segment. "start": documents start together, each with a short last segment.
    if alignment == "right":
        grid_offset = total - lengths
    elif alignment == "left":
        grid_offset = total - segments * segment_size
    elif alignment == "start":
        grid_offset = torch.zeros_like(lengths)
    else:
        raise ValueError(f"Unknown alignment {alignment!r}; choose 'right', 'left' or 'start'.")
    return SegmentPlan(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        content_start=content_start,
        lengths=lengths,
        grid_offset=grid_offset,
        segments_per_document=segments,
        segment_size=segment_size,
        pad_token_id=fill,
        compacted=compacted,
    )
