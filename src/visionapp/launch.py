"""TorchX component: the same LightningCLI `fit` as `make train`, as a DDP job (torchrun under TorchX).

    torchx run -s local_cwd src/visionapp/launch.py:train --nproc 2               # this machine
    torchx run -s kubernetes --dryrun src/visionapp/launch.py:train --image registry/app:tag --nnodes 2 --nproc 1

(`make launch` / `make launch-k8s` wrap these; .torchxconfig holds the scheduler defaults.) No
`from __future__ import annotations` here: TorchX reads the parameter types at run time.
"""

import time

from torchx import specs
from torchx.components import dist

BASE_CONFIG = "configs/train.yaml"


def train(
    *overrides: str,
    config: str = BASE_CONFIG,
    ddp_config: str = "configs/ddp.yaml",
    nnodes: int = 1,
    nproc: int = 2,
    image: str = "visionapp:latest",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,  # TorchX's own spelling for the resource argument
    run_name: str = "",
    max_retries: int = 0,
) -> specs.AppDef:
    """Fine-tune with DDP: `python -m visionapp fit` on nnodes x nproc processes.

    Args:
        overrides: extra LightningCLI arguments, e.g. --trainer.max_epochs=2
        config: the training config, as for make train: the base, or an overlay composed on the base
        ddp_config: the DDP preset composed on top of it
        nnodes: number of nodes (replicas)
        nproc: processes per node (one per GPU on GPU nodes)
        image: container image (ignored by the local_cwd scheduler, which runs in this directory)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        run_name: the run directory's name under runs/ (default: <time>-ddp<N>), the same on every rank
        max_retries: restarts of the job on failure
    """
    name = run_name or time.strftime("%Y%m%d-%H%M%S") + f"-ddp{nnodes * nproc}"
    overlay = ("--config", config) if config != BASE_CONFIG else ()
    args = ["fit", "--config", BASE_CONFIG, *overlay, "--config", ddp_config, f"--trainer.devices={nproc}",
            f"--trainer.num_nodes={nnodes}", f"--run_name={name}", *overrides]  # fmt: skip
    return _ddp(args, "visionapp", "visionapp-train", nnodes, nproc, image, cpu, gpu, memMB, max_retries)


def _ddp(
    args: list[str], module: str, name: str, nnodes: int, nproc: int, image: str, cpu: int, gpu: int, memMB: int,
    max_retries: int,
) -> specs.AppDef:  # fmt: skip
    """`python -m module *args` under torchrun on nnodes x nproc processes, each with its share of the CPUs."""
    return dist.ddp(
        *args,
        m=module,
        image=image,
        name=name,
        j=f"{nnodes}x{nproc}",
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        max_retries=max_retries,
        env={"OMP_NUM_THREADS": str(max(1, cpu // nproc)), "PYTHONUNBUFFERED": "1"},
    )


def predict(
    *options: str,
    bundle: str = "runs/latest/bundle",
    images: str = "",
    out: str = "predictions.csv",
    nnodes: int = 1,
    nproc: int = 2,
    image: str = "visionapp:latest",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
) -> specs.AppDef:
    """Score a folder with DDP: `python -m visionapp.predict` on nnodes x nproc processes, each image once.

    Args:
        options: more arguments of python -m visionapp.predict, e.g. --topk 3 --batch-size 128
        bundle: the trained run's bundle that scores the images (torchrun takes --run for its own --run-path)
        images: the folder of images (on a volume every node mounts)
        out: the CSV written (on the same shared volume: each rank writes a shard beside it, rank 0 merges them)
        nnodes: number of nodes (replicas)
        nproc: processes per node (one per GPU on GPU nodes)
        image: container image (ignored by the local_cwd scheduler, which runs in this directory)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: restarts of the job on failure (a restart resumes: what is written is skipped)
    """
    args = ["--bundle", bundle, "--images", images, "--out", out, "--devices", str(nproc), "--num-nodes", str(nnodes),
            *options]  # fmt: skip
    return _ddp(args, "visionapp.predict", "visionapp-predict", nnodes, nproc, image, cpu, gpu, memMB, max_retries)
