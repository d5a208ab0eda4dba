"""visionapp: an image classifier from data to a served, explained model, one subpackage per stage.

bundle.py, transforms.py, shapes.py   the base every stage shares: the bundle contract, the one
                                      preprocessing, the generated data set (imports no stage)
train/      python -m visionapp fit   LightningCLI, data modules, the plain model, the LightningModule
explain/    python -m visionapp.explain   Captum methods (one registry), quality measures, heatmaps
serve/      python -m visionapp.serve.archive   the TorchServe handler, request limits, archiving, a client
bench/      python -m visionapp.bench   every stage against its peer and its ceiling
launch.py   the TorchX component (make launch)
"""
