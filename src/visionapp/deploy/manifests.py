"""Kubernetes and KServe manifests for the serving image, rendered from a run (`make k8s`).

    python -m visionapp.deploy.manifests --bundle runs/latest/bundle --mar model_store/classifier.mar \
        --image registry.example/visionapp-serve:1 --replicas 2 [--cpus 2 --mem-mb 4096 --gpus 0] [--out deploy]

Fills the templates in serve/k8s/ and writes, under --out (default deploy/, not committed), for TorchServe:
  k8s/        deployment.yaml service.yaml networkpolicy.yaml hpa.yaml      kubectl apply -f deploy/k8s/
  kserve/     runtime.yaml inferenceservice.yaml networkpolicy.yaml       kubectl apply -f deploy/kserve/
  kserve/storage/config/config.properties, kserve/storage/model-store/<model>.mar and <model>-explain.mar
                                                                                 (upload to STORAGE_URI)
  prometheus-adapter-rule.yaml   the rule that makes the HPA's queue-latency metric (not a Kubernetes object)
and with --server kserve (KServe's model server in the image from serve/Dockerfile.kserve) only the kserve/ part,
its storage layout being bundle/ (the run's bundle), model-config.yaml and explain-config.yaml.
Every manifest is validated before anything is written: the built-in kinds against Kubernetes' schemas
(kubernetes-validate, strict: unknown fields are errors), KServe's kinds against the models of KServe's own
SDK (unknown fields, wrong types, missing required fields). --dry-run prints them instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import string
import sys
from pathlib import Path
from typing import Any

import yaml

from visionapp.errors import run_main
from visionapp.serve.inputs import explain_name

TEMPLATES = Path("serve/k8s")
SERVER_CONFIG = Path("serve/config.properties")
KUBERNETES_VERSION = "1.30"  # the schemas the built-in kinds are checked against (a version clusters still run)
# per server: template file -> where its rendering goes under --out
KSERVE_COMMON = {
    "kserve-inferenceservice.yaml": "kserve/inferenceservice.yaml",
    "kserve-networkpolicy.yaml": "kserve/networkpolicy.yaml",
}
MANIFESTS = {
    "torchserve": {
        "deployment.yaml": "k8s/deployment.yaml",
        "service.yaml": "k8s/service.yaml",
        "networkpolicy.yaml": "k8s/networkpolicy.yaml",
        "hpa.yaml": "k8s/hpa.yaml",
        "kserve-runtime.yaml": "kserve/runtime.yaml",
        **KSERVE_COMMON,
    },
    "kserve": {"kserve-server-runtime.yaml": "kserve/runtime.yaml", **KSERVE_COMMON},
}
EXPLAINER = "kserve-explainer.yaml"  # a fragment of the InferenceService (SLIM=1), not a manifest
ADAPTER_RULE = ("prometheus-adapter-rule.yaml", "prometheus-adapter-rule.yaml")
KSERVE_MODELS = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def render(values: dict[str, Any], templates: Path = TEMPLATES, server: str = "torchserve") -> dict[str, str]:
    """Each manifest's text: its template with `values` filled in (comments kept, for whoever reads deploy/)."""
    if not DNS_LABEL.fullmatch(values["name"]):
        raise ValueError(f"name {values['name']!r}: Kubernetes names are lower-case letters, digits and '-' (≤ 63)")
    out = {}
    extra = [ADAPTER_RULE] if server == "torchserve" else []  # the HPA's metric: TorchServe's queue latency
    for template, target in (*MANIFESTS[server].items(), *extra):
        try:
            out[target] = string.Template((templates / template).read_text()).substitute(values)
        except KeyError as e:
            raise ValueError(f"{templates / template}: no value for ${{{e.args[0]}}}") from None
    return out


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate(doc: dict) -> None:
    """Raise ValueError naming what is wrong with one manifest document."""
    kind = doc.get("kind")
    if kind in KSERVE_MODELS:
        _check_model(doc, KSERVE_MODELS[kind], kind)
        return
    import kubernetes_validate  # Kubernetes' OpenAPI schemas, shipped with the package: no cluster needed

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise ValueError(f"{kind} {doc.get('metadata', {}).get('name')}: {where}: {e.message}") from None


def _check_model(value: Any, type_name: str, path: str) -> None:
    """`value` against the OpenAPI model `type_name` of KServe's SDK (its Kubernetes parts from the Kubernetes
    client's models): no unknown fields, the right types, required fields present (the models' own checks)."""
    import kserve.models  # KServe's SDK: models generated from its CRDs' OpenAPI schemas
    import kubernetes.client.models

    if m := re.fullmatch(r"list\[(.*)\]", type_name):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        for i, v in enumerate(value):
            _check_model(v, m[1], f"{path}[{i}]")
        return
    if m := re.fullmatch(r"dict[(\[](\w+), (.*)[)\]]", type_name):  # dict(str, str) in KServe's, dict[str, str] in K8s'
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        for k, v in value.items():
            _check_model(v, m[2], f"{path}.{k}")
        return
    primitives: dict[str, Any] = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
                                  "datetime": str, "date": str}  # fmt: skip
    if type_name in primitives:
        if not isinstance(value, primitives[type_name]) or (type_name == "int" and isinstance(value, bool)):
            raise ValueError(f"{path}: expected {type_name}, got {value!r}")
        return
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a {type_name} mapping, got {value!r}")
    attrs = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(attrs))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown} for {type_name}; known: {sorted(attrs)}")
    for key, v in value.items():
        _check_model(v, cls.openapi_types[attrs[key]], f"{path}.{key}")
    try:  # the generated constructor checks required fields and enumerations
        cls(**{attrs[k]: v for k, v in value.items()})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/latest/bundle")
    ap.add_argument("--mar", default="model_store/classifier.mar", help="the archive the image serves")
    ap.add_argument("--server", choices=sorted(MANIFESTS), default="torchserve", help="the server in the image")
    ap.add_argument("--model-config", default="serve/model-config.yaml", help="kserve: its limits, in the storage")
    ap.add_argument("--explain-config", default="serve/explain-config.yaml", help="kserve: its explainers")
    ap.add_argument("--image", required=True, help="the serving image (make image-serve IMAGE=...), pushed")
    ap.add_argument("--name", default=None, help="Kubernetes name (default: the .mar's model name)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-replicas", type=int, default=None, help="the autoscalers' ceiling (default 4 × replicas)")
    ap.add_argument("--cpus", type=float, default=2)
    ap.add_argument("--mem-mb", type=int, default=4096)
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--queue-ms", type=float, default=100, help="the HPA's target queue latency per request")
    ap.add_argument(
        "--explain-image",
        default=None,
        help="kserve: the full image as the explainer component; --image is then the slim one (SLIM=1)",
    )
    ap.add_argument("--storage-uri", default=None, help="where the KServe storage layout is uploaded")
    ap.add_argument("--monitoring-namespace", default="monitoring", help="where Prometheus runs")
    ap.add_argument("--client-namespaces", nargs="*", default=[],
                    help="namespaces besides the model's own whose client-labelled pods may call it")  # fmt: skip
    ap.add_argument("--out", default="deploy")
    ap.add_argument("--dry-run", action="store_true", help="print the manifests, write nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    bundle, mar = Path(args.bundle), Path(args.mar)
    archives = [mar, mar.with_name(f"{explain_name(mar.stem)}.mar")] if args.server == "torchserve" else []
    for f in (bundle / "model.json", *archives):
        if not f.is_file():
            raise SystemExit(f"{f} is missing: make train, then make archive (RUN=... for another run)")
    if args.explain_image and args.server != "kserve":
        raise SystemExit("EXPLAIN_IMAGE (the explainer beside a slim predictor) is for SERVER=kserve")
    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise SystemExit("REPLICAS must be ≥ 1 and MAX_REPLICAS ≥ REPLICAS")
    values = template_values(args, mar.stem, bundle.resolve().parent.name)
    try:
        manifests = render(values, server=args.server)
        for target, text in manifests.items():
            if target != ADAPTER_RULE[1]:
                for doc in documents(text):
                    validate(doc)
    except ValueError as e:
        raise SystemExit(f"not rendered: {e}") from None
    if args.dry_run:
        for target, text in manifests.items():
            print(f"---\n# ---- {args.out}/{target}\n{text}")  # one YAML stream
        return 0
    write(manifests, Path(args.out))
    configs = Path(args.model_config), Path(args.explain_config)
    storage = write_storage(Path(args.out), args.server, mar, bundle, *configs)
    print(json.dumps({"image": args.image, "replicas": args.replicas, "run": values["run"], "server": args.server}))
    for target in manifests:
        print(f"  {Path(args.out) / target}")
    print(f"  {storage}/  (upload to {values['storage_uri']})")
    if args.server == "torchserve":
        print(f"apply: kubectl apply -f {args.out}/k8s/   or, with KServe: kubectl apply -f {args.out}/kserve/")
    else:
        print(f"apply, with KServe: kubectl apply -f {args.out}/kserve/")
    return 0


def template_values(args: argparse.Namespace, model: str, run_name: str) -> dict:
    """What the templates' {placeholders} become."""
    values = {
        "name": args.name or model, "model": model, "image": args.image, "version": run_name[:63], "run": run_name,
        "runtime": f"{args.name or model}-{args.server}",
        "replicas": args.replicas, "max_replicas": args.max_replicas or 4 * args.replicas,
        "cpus": f"{args.cpus:g}", "mem_mb": args.mem_mb, "queue_ms": f"{args.queue_ms:g}",
        "storage_uri": args.storage_uri or f"pvc://visionapp-models/{run_name}",
        "monitoring_namespace": args.monitoring_namespace,
        "other_clients": other_clients(args.name or model, args.client_namespaces),
        "gpu": f', nvidia.com/gpu: "{args.gpus}"' if args.gpus else "",  # in the resources' requests and limits
        "slim_arg": ', "--slim"' if args.explain_image else "",  # the predictor: the slim image
    }  # fmt: skip
    values["explainer"] = explainer(args.explain_image, values) if args.explain_image else ""
    return values


def explainer(image: str, values: dict, templates: Path = TEMPLATES) -> str:
    """The InferenceService's explainer component (YAML under spec:, serve/k8s/kserve-explainer.yaml, its comments
    kept as every template's are): the full image beside a predictor run from the slim one."""
    return string.Template((templates / EXPLAINER).read_text()).substitute(values, explain_image=image)


def other_clients(name: str, namespaces: list[str]) -> str:
    """The NetworkPolicies' peer for client pods in other namespaces the user named (none: the model's own
    namespace only), as YAML lines to follow the own-namespace peer."""
    bad = [n for n in namespaces if not DNS_LABEL.fullmatch(n)]
    if bad:
        raise ValueError(f"client namespaces {bad}: Kubernetes names are lower-case letters, digits and '-'")
    if not namespaces:
        return ""
    names = (
        f"{{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: In, values: {json.dumps(namespaces)}}}]}}"
    )
    return f'\n        - namespaceSelector: {names}\n          podSelector: {{matchLabels: {{{name}-client: "true"}}}}'


def write(manifests: dict[str, str], out: Path) -> None:
    for target, text in manifests.items():
        path = out / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def write_storage(out: Path, server: str, mar: Path, bundle: Path, model_config: Path, explain_config: Path) -> Path:
    """KServe's storage layout for the runtime: TorchServe's config/config.properties + model-store/<name>.mar, or
    KServe's model server's bundle/ + model-config.yaml. Replaced whole: nothing of another run stays in it."""
    storage = out / "kserve" / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    if server == "torchserve":
        # the project's server config as it is: the image's TS_* variables and the ServingRuntime's env bind it
        # and point it at /mnt/models/model-store
        (storage / "config").mkdir()
        (storage / "model-store").mkdir()
        shutil.copy2(SERVER_CONFIG, storage / "config" / "config.properties")
        for archive in (mar, mar.with_name(f"{explain_name(mar.stem)}.mar")):  # --models all registers both
            shutil.copy2(archive, storage / "model-store" / archive.name)
    else:
        shutil.copytree(bundle, storage / "bundle")
        shutil.copy2(model_config, storage / "model-config.yaml")
        shutil.copy2(explain_config, storage / "explain-config.yaml")
    return storage


if __name__ == "__main__":
    sys.exit(run_main(main))
