"""Split a batch of tokenized documents into aligned segments.

Every document is tokenized once by the backbone's tokenizer (`[CLS] content [SEP]`, padded either
side). The special tokens are stripped and the content is cut into segments of `segment_size`
tokens. All documents end at the same step: a document needing fewer segments starts later and
keeps its memory untouched until then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    """The content of one step for the documents that have tokens in it (its `rows`)."""

    rows: torch.Tensor  # [A] indices of the active documents in the batch
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

    @property
    def num_segments(self) -> int:
        return int(self.segments_per_document.max())

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def active_mask(self) -> torch.Tensor:
        """[B, T] bool: which documents have content at each step."""
        steps = torch.arange(self.num_segments, device=self.input_ids.device)
        first_step = self.num_segments - self.segments_per_document
        return steps[None, :] >= first_step[:, None]

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
        index = (self.content_start[rows] + begin[rows])[:, None] + columns[None, :]
        index = torch.where(mask, index, self.content_start[rows, None])  # any valid column where masked
        ids = self.input_ids[rows].gather(1, index).masked_fill(~mask, self.pad_token_id)
        types = None if self.token_type_ids is None else self.token_type_ids[rows].gather(1, index) * mask
        return Segment(rows=rows, input_ids=ids, attention_mask=mask.long(), token_type_ids=types)


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
) -> SegmentPlan:
    """Strip the tokenizer's outer [CLS]/[SEP] and place every document's content on the segment grid.

    Raises ValueError for inputs that cannot be segmented faithfully (see the messages).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
    if attention_mask is None:
        if pad_token_id is not None and bool((input_ids == pad_token_id).any()):
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
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    has_cls = count > 0
    if cls_token_id is not None:
        has_cls &= input_ids[rows, first] == cls_token_id
    content_start = first + has_cls.long()
    has_sep = last >= content_start
    if sep_token_id is not None:
        has_sep &= input_ids[rows, last] == sep_token_id
    lengths = (last + 1 - has_sep.long() - content_start).clamp(min=0) * (count > 0)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Document(s) at batch index {empty} have no tokens besides special tokens and padding; "
            "remove empty documents before calling the model."
        )
    segments = (lengths + segment_size - 1) // segment_size
    total = int(segments.max()) * segment_size
    # Documents end together on the last step; "right" pads a short first segment, "left" a short last one.
    grid_offset = total - lengths if alignment == "right" else total - segments * segment_size
    return SegmentPlan(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        content_start=content_start,
        lengths=lengths,
        grid_offset=grid_offset,
        segments_per_document=segments,
        segment_size=segment_size,
        pad_token_id=fill,
    )
