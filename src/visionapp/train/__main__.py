"""python -m visionapp.train fit --config configs/train.yaml  (the same as python -m visionapp fit)"""

import sys

from visionapp.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
