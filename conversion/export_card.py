"""The model card of an export: the card given, with the images it links and the results JSON it was generated
from, or a minimal card."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from conversion.export_folder import ExportError

# The results JSON a card was generated from, shipped beside it (`model_cards/NAME.json` for `NAME.md`).
CARD_RESULTS = "card_results.json"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PIPELINE_TAGS = {"RMTForSequenceClassification": "text-classification", "RMTForCausalLM": "text-generation"}


def minimal_card(repo_id: str, architecture: str) -> str:
    """A short README.md for an export without `--card`."""
    tag = PIPELINE_TAGS.get(architecture, "feature-extraction")
    auto_class = {
        "RMTForCausalLM": "AutoModelForCausalLM",
        "RMTForSequenceClassification": "AutoModelForSequenceClassification",
    }.get(architecture, "AutoModel")
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: {tag}\n"
        "tags:\n- rmt\n- recurrent-memory\n- long-context\n---\n\n"
        f"# {repo_id}\n\nA Recurrent Memory Transformer ({architecture}) built with `modeling_rmt`; it reads documents "
        "far longer than its backbone's position limit, segment by segment, with memory carried between segments.\n\n"
        f"```python\nfrom transformers import AutoTokenizer, {auto_class}\n\n"
        f'model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)\n```\n'
    )


def copy_card(card: Path, staging: Path) -> None:
    """README.md from `card`, with the local images it links (same folder) beside it, and the results JSON
    it was generated from (`NAME.json` beside `NAME.md`) as `CARD_RESULTS`."""
    text = card.read_text()
    (staging / "README.md").write_text(text)
    results = card.with_suffix(".json")
    if results.is_file():
        try:
            parsed = json.loads(results.read_text())
        except json.JSONDecodeError as error:
            raise ExportError(f"{results} (the card's results) is not valid JSON: {error}; fix or move it") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("training", {}), dict):
            raise ExportError(f"{results} is not a card's results JSON (an object with a training block)")
        shutil.copyfile(results, staging / CARD_RESULTS)
    for link in dict.fromkeys(IMAGE_LINK.findall(text)):
        if "://" in link or link.startswith(("/", "data:")):
            continue
        image = card.parent / link
        if "/" in link or "\\" in link or not image.is_file():
            print(f"warning: the card links {link}, which is not a file beside it; not exported", file=sys.stderr)
            continue
        shutil.copy2(image, staging / link)
