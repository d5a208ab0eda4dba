"""Tooling around the serving runtime, never shipped in a server: packing the .mar (archive.py), compiling the
model ahead of time (export.py), the Kubernetes and KServe manifests (manifests.py), a server on free loopback ports
(local.py) and a load generator (loadgen.py). Imports the runtime (visionapp.serve), never the reverse."""
