"""Serving: the TorchServe handler (handler.py) and its request parsing and limits (inputs.py), packing a bundle
into a .mar (archive.py), a client that finds the key (client.py), a server on free ports (local.py) and a
load generator (load.py). Reads only the bundle; never imports the training stack."""
