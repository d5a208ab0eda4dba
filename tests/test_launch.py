"""Scale: the training as a real 2-process DDP job through TorchX's local scheduler, and the Kubernetes
job spec (dry run, no cluster needed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from visionapp.bundle import load_bundle
from visionapp.train.data import LoaderConfig, ShapesDataModule


@pytest.mark.slow
def test_two_process_ddp_through_torchx_writes_a_valid_run(tmp_path: Path, shapes_root: Path) -> None:
    runs = tmp_path / "runs"
    args = (
        f"--data.init_args.root={shapes_root} --data.init_args.image_size=64 --data.init_args.num_train=256 "
        "--data.init_args.num_val=100 --data.init_args.num_test=100 --data.init_args.loader.num_workers=0 "
        "--data.init_args.loader.mode=device "  # our own sharding (the workers path shards by Lightning's sampler)
        f"--model.weights=null --trainer.max_epochs=1 --trainer.enable_model_summary=false --runs_dir={runs}"
    )
    proc = subprocess.run(
        ["make", "-s", "launch", "NPROC=2", f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    run = (runs / "latest").resolve()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and run.name.endswith("-ddp2") and metrics["input_pipeline"] == "device"
    # val_acc is that of the whole validation split (metrics synced across ranks), not one rank's half:
    # the bundle (the best checkpoint's weights) re-evaluated on all 100 images in this process agrees.
    bundle = load_bundle(run / "bundle")
    dm = ShapesDataModule(shapes_root, image_size=64, num_val=100, loader=LoaderConfig(num_workers=0), batch_size=50)
    dm.setup("fit")
    correct = total = 0
    with torch.no_grad():
        for x, y in map(dm.on_after_batch_transfer, dm.val_dataloader()):
            correct += int((bundle.model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 100
    assert metrics["val_acc"] == pytest.approx(correct / total, abs=1e-6)
    assert {p.name for p in runs.iterdir()} == {"latest", run.name}  # one run directory, from rank 0


@pytest.mark.slow
def test_kubernetes_dry_run_spec(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["make", "-s", "launch-k8s", "IMAGE=registry.example/visionapp:7", "NNODES=3", "NPROC=2", "CPUS=4",
         "GPUS=1", "MEM_MB=16384", "DRYRUN=1", "ARGS=--trainer.max_epochs=9"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = proc.stdout
    assert "kind: Job" in spec and "batch.volcano.sh" in spec
    assert spec.count("image: registry.example/visionapp:7") == 3  # one task per node
    assert "--nnodes 3 --nproc_per_node" in spec and "2 " in spec.split("--nproc_per_node", 1)[1][:5]
    assert "-m visionapp fit --config configs/train.yaml" in " ".join(spec.split())
    assert "--trainer.max_epochs=9" in spec and "--trainer.devices=2" in spec
    assert "cpu: 4000m" in spec and "nvidia.com/gpu: '1'" in spec and "memory: 16384M" in spec


@pytest.mark.slow
def test_kubernetes_dry_run_spec_of_the_predict_job() -> None:
    proc = subprocess.run(
        ["make", "-s", "launch-predict-k8s", "IMAGE=registry.example/visionapp:7", "NNODES=2", "NPROC=1",
         "IMAGES=/data/photos", "OUT=/data/predictions.csv", "DRYRUN=1", "ARGS=--topk 3"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = " ".join(proc.stdout.split())
    assert "kind: Job" in spec and spec.count("image: registry.example/visionapp:7") == 2  # one task per node
    assert "--nnodes 2 --nproc_per_node 1" in spec and "-m visionapp.predict --bundle runs/latest/bundle" in spec
    assert "--images /data/photos --out /data/predictions.csv --devices 1 --num-nodes 2 --topk 3" in spec
