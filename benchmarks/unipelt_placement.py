"""UniPELT's adapter placement: the official LN(h + x) input (the default) against peftlab's earlier `ffn_output`.

A paired, five-seed comparison run by the claims engine (`peftlab.claims`, the engine of `peftlab reproduce`): the
real all-MiniLM-L6-v2 on movie_reviews at the CPU budget (800 train examples, 2 epochs, 300 dev / 300 test), both
sides at the same learning rate (1e-3, the demo's UniPELT rate) and official init; only the placement differs.
Writes the table to benchmarks/results/unipelt_placement.md.

    python benchmarks/unipelt_placement.py [--output_dir DIR]     # about 15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peftlab import claims

HERE = Path(__file__).resolve().parent


def placement_claim() -> claims.Claim:
    def side(placement: str) -> claims.Side:
        return claims.Side("unipelt", {"adapter_placement": placement}, (1e-3,), f"UniPELT {placement}")

    return claims.Claim(
        "unipelt-official-placement",
        "issue #8: the official placement must not cost accuracy",
        "movie_reviews",
        "minilm",
        side("official"),
        (side("ffn_output"),),
        ">=",
        args={"max_seq_length": 64, "per_device_train_batch_size": 16},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("peftlab-claims"))
    args = parser.parse_args()
    outcomes = claims.reproduce([placement_claim()], claims.get_budget("cpu"), args.output_dir)
    table = claims.markdown(outcomes)
    (HERE / "results" / "unipelt_placement.md").write_text(f"# UniPELT adapter placement\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
