"""python -m visionapp.explain --run runs/latest [--samples 50]   (make explain): see visionapp.explain.quality"""

import sys

from visionapp.errors import run_main
from visionapp.explain.quality import main

if __name__ == "__main__":
    sys.exit(run_main(main))
