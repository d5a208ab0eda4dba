"""Captum attribution heatmaps for your images, from a trained bundle.

    python explain/heatmap.py --bundle runs/latest/bundle --images photo.jpg some/folder \
        --method integrated_gradients --out heatmaps/

The same as `python -m visionapp.explain.heatmap`; the code is in src/visionapp/explain/heatmap.py.
"""

import sys

from visionapp.explain.heatmap import main

if __name__ == "__main__":
    sys.exit(main())
