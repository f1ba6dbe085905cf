"""A decoder checkpoint's tokenizer names the tokens its generation stops and pads with.

Clients stop generation at `tokenizer.eos_token_id` and pad with `tokenizer.pad_token_id`
(lm-evaluation-harness needs the end token to generate at all). An encoder backbone's tokenizer
(MiniLM's) names no end-of-sequence token, while the decoder built on it answers up to `[SEP]`.
"""

from __future__ import annotations

from typing import Any


def with_generation_tokens(tokenizer: Any, eos_token_id: int | list[int] | None, pad_token_id: int | None) -> Any:
    """`tokenizer` (changed in place) naming the generation config's end token (the first of a list) as its
    end-of-sequence token and its pad token as padding, where it names none. ValueError where it names
    another token than the one generation uses."""
    stops = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for role, wanted, allowed in (("eos", stops[0] if stops else None, stops), ("pad", pad_token_id, [pad_token_id])):
        if wanted is None:
            continue
        found = getattr(tokenizer, f"{role}_token_id")
        if found is None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(wanted))
        elif found not in allowed:
            raise ValueError(
                f"The tokenizer's {role} token is id {found} but the model's generation config uses {wanted}: give "
                f"the tokenizer the model was trained with, or set generation_config.{role}_token_id to {found}."
            )
    return tokenizer
