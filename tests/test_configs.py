"""Every shipped config trains end to end, past every callback's milestone; the LR schedule covers a thawed
backbone, resumes with the LRs it would have had, and is set from YAML."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, Interrupted, fit, run_fit

from visionapp.train.schedule import WarmupCosine, run_length_kwargs

# configs/mlflow.yaml adds a logger only: test_track trains with it, against a real MLflow server
CONFIGS = sorted(c for c in (ROOT / "configs").glob("*.yaml") if c.name != "mlflow.yaml")


def composed(config: Path) -> dict:
    """The base with the overlay on top, two levels deep: enough to read the data class and the callbacks."""
    base, overlay = (yaml.safe_load(p.read_text()) for p in (ROOT / "configs/train.yaml", config))
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in overlay.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    callbacks = out["trainer"].get("callbacks", []) + out["trainer"].get("callbacks+", [])
    out["trainer"]["callbacks"] = callbacks
    return out


def tiny_args(config: Path, tmp: Path, photos: Path) -> list[str]:
    """Tiny data for whichever data module the config picks (a new config is covered by what it composes)."""
    cfg = composed(config)
    data = cfg["data"]["class_path"].rsplit(".", 1)[1]
    by_data = {
        "ShapesDataModule": [f"--data.init_args.root={tmp / 'shapes'}", "--data.init_args.num_train=48",
                             "--data.init_args.num_val=10", "--data.init_args.num_test=10"],
        "FolderDataModule": [f"--data.init_args.root={photos}"],
        "TorchvisionDataModule": ["--data.init_args.name=fake"],  # CIFAR-10's shape, no download
    }  # fmt: skip
    args = [*by_data[data], "--data.init_args.image_size=32", "--data.init_args.batch_size=8"]
    args += ["--data.init_args.loader.num_workers=0", "--model.weights=null", "--trainer.enable_model_summary=false"]
    # Two epochs at least, and past every epoch milestone a callback declares (a backbone thaw).
    milestones = [c.get("init_args", {}).get("unfreeze_backbone_at_epoch", 0) for c in cfg["trainer"]["callbacks"]]
    args += [f"--trainer.max_epochs={max(2, max(milestones) + 1)}", "--trainer.log_every_n_steps=1"]
    if cfg["trainer"].get("strategy") == "ddp":
        args.append("--trainer.devices=2")  # as the config's header says
    return [*args, f"--runs_dir={tmp / 'runs'}"]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_trains_past_its_milestones(config: Path, tmp_path: Path, photos_root: Path) -> None:
    args = tiny_args(config, tmp_path, photos_root)
    proc = subprocess.run(
        ["make", "-s", "train", f"CONFIG=configs/{config.name}", f"ARGS={' '.join(args)}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = (tmp_path / "runs" / "latest").resolve()
    metrics = json.loads((run / "metrics.json").read_text())
    max_epochs = int(next(a for a in args if "max_epochs" in a).split("=")[1])
    assert metrics["epochs"] == max_epochs and (run / "bundle" / "model.pt").is_file()
    thaws = [c for c in composed(config)["trainer"]["callbacks"] if "unfreeze_backbone_at_epoch" in str(c)]
    if thaws:  # the thawed backbone is a second parameter group, with its own LR, logged every step after it
        lrs = list(csv.DictReader((run / "metrics.csv").open()))
        assert any(r.get("lr-AdamW/pg2") for r in lrs), "no LR logged for the thawed backbone"


def _lrs(run: Path) -> dict[int, tuple[str, str]]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return {int(r["step"]): (r["lr-AdamW/pg1"], r["lr-AdamW/pg2"]) for r in rows if r.get("lr-AdamW/pg1")}


@pytest.mark.slow
def test_a_run_resumed_after_the_thaw_trains_as_the_uninterrupted_run(tmp_path: Path, photos_root: Path) -> None:
    """configs/folder.yaml (backbone thawed at epoch 1), interrupted at the start of epoch 2 and resumed from
    last.ckpt: the resumed epoch trains the parameters the uninterrupted run trains (requires_grad and a gradient,
    the backbone included, not only its LRs), its backbone weights move, and it steps with the same LRs: the
    thawed group and where its warm-up started come back with the optimizer's state."""
    base = [
        "--config=configs/train.yaml",
        "--config=configs/folder.yaml",
        f"--data.init_args.root={photos_root}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
        "--data.init_args.loader.num_workers=0",
        "--trainer.max_epochs=3",
        "--trainer.log_every_n_steps=1",
        "--model.scheduler.init_args.warmup_fraction=0.25",  # the backbone's warm-up spans steps: visible below
    ]

    def recorded(name: str) -> str:
        callback = {"class_path": "helpers.RecordTrainable", "init_args": {"out": str(tmp_path / name)}}
        return f"--trainer.callbacks+={json.dumps(callback)}"

    whole = fit(tmp_path / "whole", *base, recorded("whole.json"))
    crashed = tmp_path / "crashed"
    with pytest.raises(Interrupted):
        fit(
            crashed,
            *base,
            "--run_name=r",
            '--trainer.callbacks+={"class_path": "helpers.InterruptAt", "init_args": {"epoch": 2}}',
        )
    checkpoint = crashed / "r" / "checkpoints" / "last.ckpt"
    resumed = fit(tmp_path / "resumed", *base, f"--ckpt_path={checkpoint}", recorded("resumed.json"))
    trained = {run: json.loads((tmp_path / f"{run}.json").read_text()) for run in ("whole", "resumed")}
    assert set(trained["resumed"]) == {"2"}  # the resumed run trains epoch 2 only
    assert trained["resumed"]["2"] == trained["whole"]["2"]
    backbone = [n for n, (grad, has) in trained["whole"]["2"].items() if n.startswith("model.") and "fc" not in n]
    assert backbone and all(trained["resumed"]["2"][n] == [True, True] for n in backbone)
    before = torch.load(checkpoint, weights_only=False)["state_dict"]
    after = torch.load(resumed / "bundle" / "model.pt", weights_only=True)
    convs = [k for k in after if k.endswith(".weight") and after[k].dim() == 4]
    moved = sum(not torch.equal(before[f"model.{k}"], after[k]) for k in convs)
    assert moved == len(convs), f"{moved} of {len(convs)} convolution weights changed over the resumed epoch"
    lrs_before, lrs_after = _lrs(whole), _lrs(resumed)
    assert lrs_after and min(lrs_after) > min(lrs_before)  # the resumed run logs only the steps after the checkpoint
    assert {s: lrs_before[s] for s in lrs_after} == lrs_after
    assert all(pg2 for pg1, pg2 in lrs_after.values())


def test_warmup_cosine_gives_a_group_added_later_its_own_warmup_and_decay() -> None:
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([head], lr=1.0)
    sched = WarmupCosine(opt, total_steps=20, warmup_fraction=0.2)  # 4 warm-up steps
    seen = []
    for step in range(20):
        if step == 10:
            opt.add_param_group({"params": [backbone], "lr": 0.1})  # as BackboneFinetuning does
        opt.step()  # the pre-step hook applies the schedule to the new group before it is used
        seen.append([g["lr"] for g in opt.param_groups])
        sched.step()
    assert seen[0] == [0.25] and seen[3] == [1.0] and seen[19][0] < 0.01
    backbone_lrs = [lrs[1] for lrs in seen[10:]]
    assert backbone_lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # its own warm-up to its own peak
    assert backbone_lrs[4:] == sorted(backbone_lrs[4:], reverse=True) and backbone_lrs[-1] < 0.01


def test_schedulers_with_an_unset_total_steps_get_the_runs_length() -> None:
    from functools import partial

    assert run_length_kwargs(WarmupCosine, 100) == {"total_steps": 100}
    assert run_length_kwargs(partial(WarmupCosine, warmup_fraction=0.1, total_steps=None), 100) == {"total_steps": 100}
    assert run_length_kwargs(partial(WarmupCosine, total_steps=7), 100) == {}  # set in YAML: kept
    assert run_length_kwargs(torch.optim.lr_scheduler.StepLR, 100) == {}


def test_a_yaml_override_changes_the_schedule(tmp_path: Path, shapes_root: Path) -> None:
    run = run_fit(
        tmp_path / "runs",
        shapes_root,
        "--model.scheduler=torch.optim.lr_scheduler.ConstantLR",
        "--model.scheduler.init_args.factor=0.5",
        "--model.scheduler.init_args.total_iters=1000",
        "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    )
    lrs = [float(r["lr-AdamW"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("lr-AdamW")]
    assert lrs == [0.0005] * 3  # AdamW's 0.001 x 0.5, flat: not the warm-up/cosine default
    assert "ConstantLR" in (run / "config.yaml").read_text()
