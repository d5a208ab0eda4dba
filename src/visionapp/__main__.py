"""Train, validate, test or predict with LightningCLI.

python -m visionapp fit --config configs/train.yaml [--trainer.max_epochs=2 ...]
"""

import sys

from visionapp.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
