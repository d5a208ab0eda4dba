"""Train, validate, test or predict with LightningCLI.

python -m visionapp fit --config configs/train.yaml [--trainer.max_epochs=2 ...]
"""

from visionapp.train.cli import cli_main

if __name__ == "__main__":
    cli_main()
