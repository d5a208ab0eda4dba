"""Explaining: Captum attribution methods declared once (methods.py), the attributions and their maps
(attribution.py), quality measures (quality.py, `python -m visionapp.explain`) and heatmap figures
(heatmap.py). Reads only the bundle; never imports the training stack."""
