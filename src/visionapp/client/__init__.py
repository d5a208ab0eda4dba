"""Clients of a running server: the HTTP calls that find and renew TorchServe's key (api.py, also `python -m
visionapp.client.api`) and the demo page (demo.py, make demo). Never shipped in a server."""
