"""Move the finished cells of an evaluation kept elsewhere into a card's results JSON.

    python -m rmt_training.merge_cells snapshots/armt-minilm-qa1-evaluation.json model_cards/armt-minilm-qa1.json

A long evaluation (hours of 64k-token documents) runs into its own results file, so the card's file never
holds a half-measured cell; `evaluate_lengths` resumes it there. Once cells finish, this copies them into
the card's file: both must have measured the same checkpoint (its tensors' SHA-256) with the same seed, and a
cell the card already has is left as it is (reported, never overwritten). Unfinished cells stay behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .evaluate_lengths import cell_key, load_results, save_results, sort_cells

IDENTITY = ("tensors_sha256", "seed")


def identity_differences(first: dict, second: dict) -> list[str]:
    """Which of checkpoint and seed (`IDENTITY`) two results files measured differently."""
    ours, theirs = first.get("evaluated", {}), second.get("evaluated", {})
    return [key for key in IDENTITY if ours.get(key) != theirs.get(key)]


def merge_cells(source: Path, target: Path) -> list[dict]:
    """Copy `source`'s finished cells that `target` lacks into `target`; returns the cells copied."""
    measured, card = load_results(source), load_results(target)
    if not measured or not card:
        raise SystemExit(f"Nothing to merge: {source if not measured else target} is missing or empty.")
    if different := identity_differences(measured, card):
        raise SystemExit(
            f"{source} and {target} measured different checkpoints or seeds ({', '.join(different)} differ): "
            "evaluate the card's checkpoint with its seed."
        )
    cells = card.setdefault("evaluation", [])
    present = {cell_key(cell): cell for cell in cells}
    copied = [cell for cell in measured.get("evaluation", []) if cell_key(cell) not in present]
    for cell in measured.get("evaluation", []):
        if cell_key(cell) in present and present[cell_key(cell)] != cell:
            print(f"kept {target}'s own cell {cell_key(cell)}; {source} measured it again")
    cells += copied
    sort_cells(cells)
    save_results(target, card)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the results file the evaluation ran into")
    parser.add_argument("target", type=Path, help="the card's results JSON")
    args = parser.parse_args(argv)
    copied = merge_cells(args.source, args.target)
    for cell in copied:
        print(f"copied {cell['task']} {cell['num_tokens']:,} tokens, {cell['noise']}, {cell['dtype']}: "
              f"{cell['correct']}/{cell['samples']}")  # fmt: skip
    unfinished = load_results(args.source).get("unfinished", [])
    print(f"{len(copied)} cells copied; {len(unfinished)} unfinished left in {args.source}")


if __name__ == "__main__":
    main()
