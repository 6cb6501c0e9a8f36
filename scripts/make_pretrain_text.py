"""Write the bundled pretraining text under `data/pretrain/`: the small base of the methods lab.

`qtrain compare configs/compare_summarization.yaml` compares fine-tuning methods on a *pretrained*
base: methods that only steer a model (prompt tuning, (IA)³, BitFit) have nothing to steer in a
random one. `configs/pretrain_tiny.yaml` pretrains that base with qtrain itself (full training,
`format: text`) on this file: dialogues of the same world as data/dialogsum (names, plans, places,
times) and plain-prose accounts of them, written by the dialogsum generator with another seed. No
dialogue of data/dialogsum's train or eval split appears here. 60% of the rows are a dialogue
followed by its account ("dialogue, then what happened"); the rest are a dialogue or an account
alone. None uses the summarization format's prompt ("Summarize the following conversation."),
so learning to answer that prompt is the fine-tuning's job.

Everything comes from fixed seeds with no network; the output is byte-identical from run to run
(a test regenerates it and compares).

Usage:
    python scripts/make_pretrain_text.py [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # so the sibling scripts import when this file is loaded by path
    sys.path.insert(0, _HERE)

from make_dialogsum_data import SEED as DIALOGSUM_SEED  # noqa: E402
from make_dialogsum_data import generate  # noqa: E402
from make_quickstart_data import write_jsonl  # noqa: E402

SEED = 7
N_ROWS = 4000
PAIRED = 0.6  # dialogue followed by its account


def pretrain_rows(seed: int = SEED, n_rows: int = N_ROWS) -> list[dict[str, str]]:
    """`{"text": ...}` rows; dialogues of the dialogsum splits are left out."""
    held_out = {row["dialogue"] for part in generate(DIALOGSUM_SEED) for row, _ in part}
    train, evaluation = generate(seed, n_train=n_rows + 600, n_eval=0)
    pairs = [row for row, _ in train + evaluation if row["dialogue"] not in held_out][:n_rows]
    if len(pairs) < n_rows:
        raise RuntimeError(f"only {len(pairs)} new dialogues; raise the generator's count")
    rng = random.Random(seed)
    rows = []
    for row in pairs:
        r = rng.random()
        if r < PAIRED:
            text = f"{row['dialogue']}\n\n{row['summary']}"
        elif r < (1 + PAIRED) / 2:
            text = row["dialogue"]
        else:
            text = row["summary"]
        rows.append({"text": text})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/pretrain", help="output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = pretrain_rows()
    write_jsonl(out / "text.jsonl", rows)
    print(f"wrote {len(rows)} rows of pretraining text to {out / 'text.jsonl'}")


if __name__ == "__main__":
    main()
