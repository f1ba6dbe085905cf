"""Compare two cells of a results file document by document (McNemar's exact test).

    python -m rmt_training.paired snapshots/rmt-minilm-qa1-evaluation.json [more results files of it ...]

Two cells of one task and length measured on the same documents (the same seed and indices) differ only in
the dtype, or in the noise around the same facts and question. Unpaired intervals of two such cells overlap
long before the difference is doubtful; counting the documents one cell answers right and the other wrong
tells more. Cells list the documents answered wrong (`wrong`) from `evaluate_lengths`; older cells without
that list are skipped. Several results files are compared as one where they measured the same checkpoint (its
tensors' SHA-256) with the same seed, so a cell measured again into a file of its own pairs with the card's.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

from .evaluate_lengths import load_results
from .merge_cells import identity_differences


def documents_of(cell: dict) -> tuple:
    """What makes two cells' documents the same ones: task, length and count (seed and indices are the file's)."""
    return cell["task"], cell["num_tokens"], cell["samples"]


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact p-value that both are equally often right where they disagree."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def paired_comparison(first: dict, second: dict) -> dict:
    """Documents both cells answer right, only one does, or neither; and McNemar's exact p-value."""
    for cell in (first, second):
        if "wrong" not in cell:
            raise ValueError(
                f"The cell {cell['task']} {cell['num_tokens']:,} tokens ({cell['noise']}, {cell['dtype']}) lists no "
                "documents answered wrong: measure it again with this version of evaluate_lengths."
            )
    if documents_of(first) != documents_of(second):
        raise ValueError("Paired cells need the same task, length and number of documents.")
    documents = set(range(first["samples"]))
    wrong_first, wrong_second = set(first["wrong"]), set(second["wrong"])
    only_first = len(wrong_second - wrong_first)  # the first right, the second wrong
    only_second = len(wrong_first - wrong_second)
    return {
        "both_right": len(documents - wrong_first - wrong_second),
        "only_first": only_first,
        "only_second": only_second,
        "both_wrong": len(wrong_first & wrong_second),
        "p_value": mcnemar_exact(only_first, only_second),
    }


def comparable_pairs(results: dict) -> list[tuple[dict, dict]]:
    """Pairs of cells of a results file with the same task, length and documents, each listing its wrong ones."""
    cells = [cell for cell in results.get("evaluation", []) if "wrong" in cell]
    return [(a, b) for a, b in itertools.combinations(cells, 2) if documents_of(a) == documents_of(b)]


def results_of_one_checkpoint(paths: list[Path]) -> dict:
    """The cells of several results files of one checkpoint and seed, as one results file."""
    loaded = [load_results(path) for path in paths]
    for path, results in zip(paths, loaded, strict=True):
        if not results:
            raise SystemExit(f"{path} is missing or holds no results.")
        if identity_differences(results, loaded[0]):
            raise SystemExit(f"{path} measured another checkpoint or seed than {paths[0]}: compare like with like.")
    return {"evaluation": [cell for results in loaded for cell in results.get("evaluation", [])]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results JSON files of one checkpoint and seed")
    args = parser.parse_args(argv)
    compared = []
    for first, second in comparable_pairs(results_of_one_checkpoint(args.results)):
        comparison = paired_comparison(first, second)
        compared.append(comparison)
        print(f"{first['task']} {first['num_tokens']:,} tokens, {first['samples']} documents: "
              f"{first['noise']}/{first['dtype']} vs {second['noise']}/{second['dtype']}: both right "
              f"{comparison['both_right']}, only the first {comparison['only_first']}, only the second "
              f"{comparison['only_second']}, both wrong {comparison['both_wrong']}; "
              f"p = {comparison['p_value']:.3g}")  # fmt: skip
    if not compared:
        print("No two cells list their wrong documents for the same task, length and number of documents.")
    return compared


if __name__ == "__main__":
    main()
