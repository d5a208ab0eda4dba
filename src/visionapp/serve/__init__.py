"""The serving runtime, all that ships in a .mar and a serving image: the serving core (core.py), request
parsing and limits (inputs.py), and its two adapters, TorchServe's handler (handler.py) and KServe's model server
(kserve_server.py). Reads only the bundle; imports neither the training stack nor the tooling (visionapp.deploy,
visionapp.client)."""
