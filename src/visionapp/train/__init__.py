"""Training: data modules, the plain model builder, the LightningModule, the LR schedule and the LightningCLI
wiring that writes a run directory and its bundle. `python -m visionapp fit` (= `python -m visionapp.train fit`)."""
