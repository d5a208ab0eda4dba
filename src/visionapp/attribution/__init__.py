"""Captum attributions for a bundle's model, shared by everything that explains: the explain stage (quality,
heatmap figures), the TorchServe handler (/explanations) and the run report (its mistakes' Grad-CAM).

    methods.py   the registry: each Captum method declared once (how to run it, what it costs)
    maps.py      attribute() for a batch, explain() for one image, the map resized and the overlay drawn
"""
