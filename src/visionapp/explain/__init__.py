"""Explaining: the quality measures of each attribution method (quality.py, `python -m visionapp.explain`) and the
heatmap figures (heatmap.py). The Captum methods themselves live in the shared layer (visionapp/attribution/:
the registry, methods.py, and the maps, maps.py), since training's report and the servers use them too. Reads only
the bundle; never imports the training stack."""
