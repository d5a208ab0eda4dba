"""visionapp: an image classifier from data to a served, explained model, one subpackage per stage.

bundle.py, transforms.py, shapes.py   the base every stage shares: the bundle contract, the one
                                      preprocessing, the generated data set (imports no stage)
train/      python -m visionapp fit   LightningCLI, data modules, the plain model, the LightningModule
explain/    python -m visionapp.explain   Captum methods (one registry), quality measures, heatmaps
serve/      the serving runtime (ships alone): the serving core, TorchServe's handler, KServe's model server
deploy/     python -m visionapp.deploy.archive   archiving, export, manifests, a local server, a load generator
client/     python -m visionapp.client.api   a client of the running server, and the demo page
bench/      python -m visionapp.bench   every stage against its peer and its ceiling
launch.py   the TorchX component (make launch)
"""
