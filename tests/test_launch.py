"""Scale: the training as a real 2-process DDP job through TorchX's local scheduler, and the Kubernetes
job spec (dry run, no cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT

from visionapp.bundle import load_bundle
from visionapp.train.data import LoaderConfig, ShapesDataModule


def _overlay(path: Path, *callbacks: dict) -> str:
    """A config overlay appending callbacks (a file: make's ARGS reach TorchX through a shell, JSON would not)."""
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": list(callbacks)}}))
    return f"--config={path}"


def _launch(args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # the test's callbacks (helpers) on every rank
    return subprocess.run(["make", "-s", "launch", "NPROC=2", f"ARGS={args}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_two_process_ddp_through_torchx_resumes_after_the_thaw_and_writes_a_valid_run(
    tmp_path: Path,
) -> None:
    """A 2-process DDP job through TorchX's local scheduler with the backbone thawed at epoch 0 (ThawBackbone),
    stopped at the start of epoch 1 as a pre-empted job would be, then resumed from last.ckpt as a second job: on
    each rank the resumed epoch trains the backbone (requires_grad and a gradient) and its weights move; the
    resumed job writes one valid run."""
    shapes_root = tmp_path / "shapes"  # its own: a smaller set than the shared one (which it would replace)
    data = (
        f"--data.init_args.root={shapes_root} --data.init_args.image_size=64 --data.init_args.num_train=256 "
        "--data.init_args.num_val=100 --data.init_args.num_test=100 --data.init_args.loader.num_workers=0 "
        "--data.init_args.loader.mode=device "  # our own sharding (the workers path shards by Lightning's sampler)
        "--model.weights=null --trainer.max_epochs=2 --trainer.enable_model_summary=false "
    )
    at_once = {"unfreeze_backbone_at_epoch": 0, "backbone_initial_ratio_lr": 0.1, "train_bn": False}
    thaw = {"class_path": "visionapp.train.schedule.ThawBackbone", "init_args": at_once}
    stop = {"class_path": "helpers.InterruptAt", "init_args": {"epoch": 1}}
    first = _launch(data + f"--runs_dir={tmp_path / 'first'} " + _overlay(tmp_path / "stop.yaml", thaw, stop))
    assert first.returncode != 0 and "interrupted at the start of epoch 1" in first.stdout + first.stderr
    checkpoint = next((tmp_path / "first").glob("*-ddp2/checkpoints/last.ckpt"))
    record = {"class_path": "helpers.RecordTrainable", "init_args": {"out": str(tmp_path / "trained.json")}}
    runs = tmp_path / "runs"
    proc = _launch(data + f"--runs_dir={runs} --ckpt_path={checkpoint} " + _overlay(tmp_path / "go.yaml", thaw, record))
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    for rank in ("trained.json", "trained.rank1.json"):  # the resumed epoch trains the backbone on every rank
        trained = json.loads((tmp_path / rank).read_text())
        assert set(trained) == {"1"}
        backbone = {n: v for n, v in trained["1"].items() if n.startswith("model.") and ".fc." not in n}
        assert backbone and all(v == [True, True] for v in backbone.values()), rank
    run = (runs / "latest").resolve()
    before = torch.load(checkpoint, weights_only=False)["state_dict"]
    after = torch.load(run / "bundle" / "model.pt", weights_only=True)
    convs = [k for k in after if k.endswith(".weight") and after[k].dim() == 4]
    moved = sum(not torch.equal(before[f"model.{k}"], after[k]) for k in convs)
    assert moved == len(convs), f"{moved} of {len(convs)} convolution weights changed over the resumed epoch"
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
    assert total == 100  # within one image: a barely trained model has near-ties that other batch sizes and
    assert metrics["val_acc"] == pytest.approx(correct / total, abs=0.011)  # thread counts may break either way
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
