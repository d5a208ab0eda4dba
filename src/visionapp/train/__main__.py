"""python -m visionapp.train fit --config configs/train.yaml  (the same as python -m visionapp fit)"""

from visionapp.train.cli import cli_main

if __name__ == "__main__":
    cli_main()
