"""The predict stage: a run's bundle scores a folder of any size with Lightning's `Trainer.predict`, on one process,
several (DDP) or a cluster (TorchX); one row per image, written as it goes, resumable.

    python -m visionapp.predict --bundle runs/latest/bundle --images photos/ --out predictions.csv

It reads the bundle only (the stage contract: its model, its preprocessing, its calibrated temperature), never the
training stack.
"""
