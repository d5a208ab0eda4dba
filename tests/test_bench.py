"""The benchmarks run on a tiny setting and write their keys (their figures are not asserted: timing
thresholds have no place in tests on shared machines)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import train_bench


def test_train_bench_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    args = ["--root", str(tmp_path / "shapes"), "--image-size", "48", "--num-train", "160", "--steps", "3",
            "--warmup", "1", "--rounds", "1", "--out", str(out)]  # fmt: skip
    assert train_bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result.keys() >= {"images_per_second", "raw", "train.loop_vs_ceiling", "train.lightning_vs_loop"}
    assert all(v > 0 for v in result["images_per_second"].values())
