"""What each part of the delta encoder buys on the MiniLM fp32 fine-tune (stored % of raw per snapshot).

    python benchmarks/ablation.py

Each row commits the same chain (every snapshot against the previous one) with one more part on.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpupas
from benchmarks.checkpoints import build_checkpoint_sets
from gpupas.pas.settings import get_setting

ROWS = [
    ("before (context groups of at least 32 KiB)", {"min_group": 32768, "row_mask": False, "predict": False}),
    ("context groups of at least 8 KiB", {"row_mask": False, "predict": False}),
    ("+ unchanged-row masks", {"predict": False}),
    ("+ extrapolation (`pred`): the default now", {}),
]


def main() -> None:
    snaps = build_checkpoint_sets()["minilm-fp32"]
    print("| encoder | " + " | ".join(name for name, _ in snaps[1:]) + " |")
    print("|---" * len(snaps) + "|")
    for label, change in ROWS:
        setting = dataclasses.replace(get_setting("default"), **change)
        sizes, base = [], None
        with tempfile.TemporaryDirectory() as tmp, gpupas.create_archive(Path(tmp) / "a") as arc:
            for i, (_, tensors) in enumerate(snaps):
                m = arc.commit(tensors, snapshot=f"s{i}", base=base, setting=setting)
                base = m.id
                if i:
                    sizes.append(100 * m.stored_bytes / m.raw_bytes)
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in sizes) + " |")


if __name__ == "__main__":
    main()
