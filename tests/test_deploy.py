"""Serving past one machine without a cluster or a container engine: the serving image's inputs, and every
manifest `make k8s` renders, validated against Kubernetes' schemas and KServe's own models."""

from __future__ import annotations

import copy
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import IMAGE, ROOT, TRACK_OPTIONAL, closure, loaded_distributions, requirements
from helpers import rendered as _rendered
from packaging.requirements import Requirement

from visionapp.deploy.archive import build_archives
from visionapp.deploy.manifests import documents, validate

DOCKERFILE = ROOT / "serve" / "Dockerfile"


@pytest.fixture(scope="module")
def store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store")
    serve = ROOT / "serve"
    configs = {"model_config": serve / "model-config.yaml", "explain_config": serve / "explain-config.yaml"}
    build_archives(trained_run / "bundle", name="classifier", out=out, **configs)
    return out


def make_k8s(run: Path, store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", "k8s", f"IMAGE={IMAGE}", f"RUN={run}", f"MODEL_STORE={store}", f"DEPLOY_DIR={out}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def manifests(out: Path, folder: str) -> dict[str, dict]:
    """kind -> the one document of that kind, from what kubectl apply -f deploy/<folder>/ reads."""
    docs = [d for f in sorted((out / folder).glob("*.yaml")) for d in documents(f.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), [d["kind"] for d in docs]
    return kinds


def management_unreachable(doc: dict) -> None:
    """Every TorchServe container of a rendered object binds its management API to the pod's loopback, and no
    NetworkPolicy or Service admits its port."""
    spec = doc["spec"].get("template", {}).get("spec", doc["spec"])
    for c in spec.get("containers", []):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if "TS_DISABLE_TOKEN_AUTHORIZATION" in env:  # a TorchServe container without tokens
            assert env.get("TS_MANAGEMENT_ADDRESS") == "http://127.0.0.1:8081", (doc["kind"], env)
        assert 8081 not in {p["containerPort"] for p in c.get("ports", [])}, doc["kind"]
    for rule in doc["spec"].get("ingress", []):
        assert 8081 not in {p["port"] for p in rule["ports"]}, doc["kind"]


# --- make k8s --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_make_k8s_renders_valid_manifests_from_the_run(trained_run: Path, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    r = make_k8s(trained_run, store, out, "REPLICAS=3", "CPUS=4", "MEM_MB=6144")
    assert r.returncode == 0, r.stderr
    kinds, kserve = manifests(out, "k8s"), manifests(out, "kserve")
    assert set(kinds) == {"Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler"}
    assert set(kserve) == {"ServingRuntime", "InferenceService", "NetworkPolicy"}
    for doc in [*kinds.values(), *kserve.values()]:
        validate(doc)  # as make k8s did before writing; here on what was written
        management_unreachable(doc)

    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and deployment["spec"]["replicas"] == 3
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "6144Mi"}
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == trained_run.resolve().name
    env = {e["name"]: e["value"] for e in container["env"]}
    # Probes without a token: TorchServe's keys are per process, so the cluster turns them off ...
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    # ... ready = a worker READY (after its warm-up prediction), asked inside the pod; alive = every registration
    # has one within a minute (test_explain_apart runs that command against a stuck TorchServe worker)
    assert "/models/classifier" in " ".join(container["readinessProbe"]["exec"]["command"])
    liveness = container["livenessProbe"]
    assert "/models' + p" in liveness["exec"]["command"][2]
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 60
    # ... and the NetworkPolicy admits predictions and metrics only, never the management port.
    allowed = {p["port"] for rule in kinds["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {8080, 8082} and {p["containerPort"] for p in container["ports"]} == allowed
    assert pod["securityContext"]["runAsNonRoot"] and not pod["automountServiceAccountToken"]
    assert {p["port"] for p in kinds["Service"]["spec"]["ports"]} == allowed

    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    (rule,) = yaml.safe_load((out / "prometheus-adapter-rule.yaml").read_text())
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    for series in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):  # as serve/metrics.yaml declares
        assert series in rule["metricsQuery"] and series in (ROOT / "serve" / "metrics.yaml").read_text()
    assert rule["metricsQuery"].count('model_name="classifier"') == 2  # the predictions' queue, not the explanations'

    runtime, isvc = kserve["ServingRuntime"], kserve["InferenceService"]
    # KServe's predictor pods are selected by their own label, not the Deployment's
    selector = kserve["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]
    assert selector == {"serving.kserve.io/inferenceservice": "classifier"}
    assert runtime["spec"]["containers"][0]["image"] == IMAGE
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "pytorch"
    args = " ".join(runtime["spec"]["containers"][0]["args"])
    assert "/mnt/models/model-store" in args and "/mnt/models/config/config.properties" in args
    # KServe's storage layout, next to the manifests: config/config.properties + model-store/<name>.mar
    storage = out / "kserve" / "storage"
    for mar in ("classifier.mar", "classifier-explain.mar"):  # --models all registers both
        assert (storage / "model-store" / mar).read_bytes() == (store / mar).read_bytes()
    assert (storage / "config" / "config.properties").read_text() == (ROOT / "serve" / "config.properties").read_text()


@pytest.mark.slow
def test_make_k8s_gpus_and_dry_run(trained_run: Path, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    r = make_k8s(trained_run, store, out, "GPUS=1", "DRYRUN=1")
    assert r.returncode == 0, r.stderr
    assert not out.exists(), "a dry run writes nothing"
    printed = [d for d in documents(r.stdout) if isinstance(d, dict)]
    assert {d["kind"] for d in printed} >= {"Deployment", "ServingRuntime", "InferenceService"}
    for d in printed:
        validate(d)
        for container in d["spec"].get("template", {}).get("spec", {}).get("containers", []):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    r = make_k8s(trained_run, store, out, "REPLICAS=0")
    assert r.returncode != 0 and "REPLICAS must be ≥ 1" in r.stderr
    r = subprocess.run(["make", "-s", "k8s"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "usage: make k8s IMAGE=" in r.stdout


@pytest.mark.slow
def test_make_k8s_server_kserve_needs_no_torchserve(trained_run: Path, tmp_path: Path) -> None:
    """SERVER=kserve: an InferenceService on a ServingRuntime that runs KServe's model server in the project's image
    (no .mar, no TorchServe runtime), ready on the protocol's model-ready path; the storage holds the bundle."""
    out = tmp_path / "deploy"
    r = make_k8s(trained_run, tmp_path / "no-store", out, "SERVER=kserve")
    assert r.returncode == 0, r.stderr
    assert not (out / "k8s").exists() and not (tmp_path / "no-store").exists()  # nothing archived
    kserve = manifests(out, "kserve")
    assert set(kserve) == {"ServingRuntime", "InferenceService", "NetworkPolicy"}
    for doc in kserve.values():
        validate(doc)
        management_unreachable(doc)
    (container,) = kserve["ServingRuntime"]["spec"]["containers"]
    assert container["image"] == IMAGE and "v2" in kserve["ServingRuntime"]["spec"]["protocolVersions"]
    assert "--bundle=/mnt/models/bundle" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/classifier/ready"
    assert "torchserve" not in yaml.safe_dump(kserve).lower()
    assert kserve["InferenceService"]["spec"]["predictor"]["model"]["runtime"] == "classifier-kserve"
    storage = out / "kserve" / "storage"
    assert (storage / "bundle" / "model.pt").read_bytes() == (trained_run / "bundle" / "model.pt").read_bytes()
    assert (storage / "model-config.yaml").is_file() and (storage / "explain-config.yaml").is_file()


@pytest.mark.slow
def test_make_k8s_slim_predicts_from_the_slim_image_and_explains_from_the_full_one(
    trained_run: Path, tmp_path: Path
) -> None:
    """SERVER=kserve SLIM=1: the ServingRuntime runs IMAGE (the slim image) with --slim; the InferenceService's
    explainer component runs EXPLAIN_IMAGE (the full one) on the same storage, as restricted and probed as the
    predictor; both validate against KServe's models. Without EXPLAIN_IMAGE, make says what to give."""
    full = "registry.example/visionapp-kserve:1"
    r = make_k8s(trained_run, tmp_path / "no-store", tmp_path / "no", "SERVER=kserve", "SLIM=1")
    assert r.returncode != 0 and "EXPLAIN_IMAGE=" in r.stdout + r.stderr
    out = tmp_path / "deploy"
    r = make_k8s(trained_run, tmp_path / "no-store", out, "SERVER=kserve", "SLIM=1", f"EXPLAIN_IMAGE={full}")
    assert r.returncode == 0, r.stderr
    kserve = manifests(out, "kserve")
    for doc in kserve.values():
        validate(doc)
    (predictor,) = kserve["ServingRuntime"]["spec"]["containers"]
    assert predictor["image"] == IMAGE and "--slim" in predictor["args"]
    spec = kserve["InferenceService"]["spec"]
    (explainer,) = spec["explainer"]["containers"]
    assert explainer["image"] == full and "--slim" not in explainer["args"]
    assert {e["name"]: e["value"] for e in explainer["env"]}["STORAGE_URI"] == spec["predictor"]["model"]["storageUri"]
    assert explainer["args"][:1] == ["--bundle=/mnt/models/bundle"]
    _restricted(spec["explainer"], [explainer], "the explainer component")
    _restricted(spec["predictor"], [predictor], "the slim predictor")


# --- the validators can fail ----------------------------------------------------------------------------------
def _set(doc: dict, path: str, value: object) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[last] = value
    return doc


@pytest.mark.parametrize(
    ("manifest", "path", "value", "words"),
    [
        ("k8s/deployment.yaml", "spec.replicass", 2, "replicass"),
        ("k8s/deployment.yaml", "spec.template.spec.containers.0.ports.0.containerPort", "8080", "integer"),
        ("k8s/hpa.yaml", "spec.maxReplicas", None, "maxReplicas"),
        ("kserve/inferenceservice.yaml", "spec.predictor.model.storageURI", "s3://x", "storageURI"),
        ("kserve/inferenceservice.yaml", "spec", {}, "predictor"),  # required
        ("kserve/runtime.yaml", "spec.containers.0.ports.0.containerPort", "8080", "expected int"),
        ("kserve/runtime.yaml", "spec.supportedModelFormats", {"name": "pytorch"}, "expected a list"),
    ],
)
def test_a_broken_manifest_is_refused_with_the_field_named(manifest: str, path: str, value: object, words: str) -> None:
    good = _rendered(manifest)
    validate(good)
    with pytest.raises(ValueError, match=re.escape(words)):
        validate(_set(good, path, value))


# --- the serving image's inputs (no engine needed) -------------------------------------------------------------
def dockerfile_copies(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The sources of a Dockerfile's COPY lines, with its ARG defaults filled in."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    sources = []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *src, _dest = line.replace("\\", " ").split()
        sources += [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], s) for s in src]
    return sources


def test_what_the_image_copies_exists(tmp_path: Path) -> None:
    copies = dockerfile_copies()
    made = {"model_store/classifier.mar", "model_store/classifier-explain.mar"}  # make archive's default outputs
    assert made <= set(copies)
    for src in copies:
        if src not in made:
            assert (ROOT / src).is_file(), src
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    for src in copies:  # nothing the build needs is left out of its context
        assert not any(src == i or src.startswith(i.rstrip("/") + "/") for i in ignored), src
    # make image-serve passes the archive make archive wrote, from the same MODEL_STORE/MODEL_NAME
    r = subprocess.run(["make", "-n", "image-serve", "IMAGE=x", "ENGINE=docker", "MODEL_STORE=model_store"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert "--build-arg MAR=model_store/classifier.mar" in r.stdout and "-f serve/Dockerfile" in r.stdout, r.stdout
    r = subprocess.run(["make", "-s", "image-serve", "IMAGE=x", "ENGINE=", f"MODEL_STORE={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0 and "no container engine found" in r.stdout


def test_the_image_configures_torchserve_as_make_serve_does() -> None:
    """The TS_* variables the image sets name real settings of config.properties, bind all interfaces but the
    management API's, and point at the files it copies; TorchServe's metrics config is the one make serve passes."""
    text = DOCKERFILE.read_text()
    env = dict(re.findall(r"^(?:ENV)?\s*(TS_\w+)=(\S+?)\s*\\?$", text, re.M))  # the ENV block's lines
    assert len(env) >= 5, env
    properties = {ln.split("=", 1)[0] for ln in (ROOT / "serve" / "config.properties").read_text().splitlines()
                  if "=" in ln and not ln.startswith("#")}  # fmt: skip
    properties.add("metrics_config")  # passed by make serve as TS_METRICS_CONFIG
    for name in env:
        assert name.removeprefix("TS_").lower() in properties, name
    for port, name in ((8080, "INFERENCE"), (8082, "METRICS")):
        assert env[f"TS_{name}_ADDRESS"] == f"http://0.0.0.0:{port}" and "EXPOSE 8080 8082\n" in text
    assert env["TS_MANAGEMENT_ADDRESS"] == "http://127.0.0.1:8081"  # token or not, never reachable from outside
    assert env["TS_METRICS_CONFIG"] == "/home/model-server/config/metrics.yaml" and "serve/metrics.yaml" in text
    assert "TS_METRICS_CONFIG ?= serve/metrics.yaml" in (ROOT / "Makefile").read_text()
    assert "USER model-server" in text and "--foreground" in text


def test_the_kserve_image_has_what_its_server_imports(tmp_path: Path) -> None:
    """serve/Dockerfile.kserve copies files that exist and are in the build context, and its requirements cover
    every distribution KServe's server module loads."""
    copies = dockerfile_copies(ROOT / "serve" / "Dockerfile.kserve")
    assert "runs/latest/bundle" in copies  # the default; make image-serve SERVER=kserve stages RUN's bundle
    for src in set(copies) - {"runs/latest/bundle"}:
        assert (ROOT / src).exists(), src
    r = subprocess.run(["make", "-n", "image-serve", "IMAGE=x", "ENGINE=docker", "SERVER=kserve"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    assert "--build-arg BUNDLE=model_store/classifier.bundle" in r.stdout and "Dockerfile.kserve" in r.stdout, r.stdout
    loaded = loaded_distributions("visionapp.serve.kserve_server", tmp_path)
    installed = closure([r.name for r in requirements(ROOT / "serve" / "requirements-kserve.txt")])
    # imported here only because this venv has them (each importer tries them and goes on without): kubernetes'
    # dynamic client tries kubernetes-validate (and its jsonschema), uvicorn watchfiles, httpx's CLI rich, urllib3 and
    # httpx brotli (which the demo's gradio installs)
    optional = {"kubernetes-validate", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
                "importlib-resources", "watchfiles", "rich", "pygments", "brotli", *TRACK_OPTIONAL}  # fmt: skip
    installed |= optional
    missing = {d for d in loaded if d.lower().replace("_", "-") not in installed and d != "visionapp"}
    assert not missing, f"KServe's server loads {sorted(missing)}: add them to serve/requirements-kserve.txt"


def test_the_slim_image_installs_no_torch_and_bakes_no_weights() -> None:
    """make image-serve SERVER=kserve SLIM=1 builds Dockerfile.kserve with serve/requirements-slim.txt (nothing of
    the torch stack among all it installs) and the bundle staged without its torch files; every serving image's
    requirements keep pyproject.toml's lower bounds. (What the slim server imports: test_export's kserve-slim
    server runs where only these distributions can be imported.)"""
    slim = requirements(ROOT / "serve" / "requirements-slim.txt")
    installed = closure([r.name for r in slim])
    assert not installed & {"torch", "torchvision", "captum", "matplotlib", "lightning", "scipy"}, installed
    r = subprocess.run(["make", "-n", "image-serve", "IMAGE=x", "ENGINE=docker", "SERVER=kserve", "SLIM=1"],
                       cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert "--build-arg SLIM=1 --build-arg REQUIREMENTS=serve/requirements-slim.txt" in r.stdout, r.stdout + r.stderr
    assert "-m visionapp.slim model_store/classifier.bundle --model-config serve/model-config.yaml" in r.stdout
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    bounds = {Requirement(d).name.lower(): str(Requirement(d).specifier) for d in declared}
    for name in ("requirements.txt", "requirements-kserve.txt", "requirements-slim.txt"):
        for req in requirements(ROOT / "serve" / name):
            assert bounds[req.name.lower()] == str(req.specifier), (name, req)


@pytest.mark.slow
def test_the_image_installs_what_the_mar_imports(store: Path, tmp_path: Path) -> None:
    """serve/requirements.txt holds every distribution the handler loads from the .mar (directly or through
    another requirement), with the lower bounds of pyproject.toml."""
    with zipfile.ZipFile(store / "classifier.mar") as z:
        z.extractall(tmp_path)
    loaded = loaded_distributions("handler", tmp_path)
    reqs = requirements(ROOT / "serve" / "requirements.txt")

    installed = closure([r.name for r in reqs])
    missing = {d for d in loaded if d.lower().replace("_", "-") not in installed and d != "visionapp"}
    assert not missing, f"the handler loads {sorted(missing)}: add them to serve/requirements.txt"
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    bounds = {Requirement(d).name.lower(): str(Requirement(d).specifier) for d in declared}
    for r in reqs:
        assert bounds[r.name.lower()] == str(r.specifier), r


# --- the restricted Pod Security level ---------------------------------------------------------------------------
def _restricted(pod: dict, containers: list[dict], where: str) -> None:
    """Kubernetes' "restricted" level, each field at the pod's level or every container's, plus what the project
    asks of a serving pod: no service-account token, readiness and liveness probes."""
    assert pod.get("automountServiceAccountToken") is False, where
    pod_ctx = pod.get("securityContext", {})
    for c in containers:
        ctx = c.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 0, where
        assert "readinessProbe" in c and "livenessProbe" in c, where


@pytest.mark.parametrize("server", ["torchserve", "kserve"])
def test_every_rendered_pod_passes_the_restricted_level(server: str) -> None:
    if server == "torchserve":
        deployment = _rendered("k8s/deployment.yaml")
        _restricted(deployment["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]["containers"],
                    "Deployment")  # fmt: skip
    isvc = _rendered("kserve/inferenceservice.yaml", server)
    runtime = _rendered("kserve/runtime.yaml", server)
    # KServe builds the predictor's pod from the InferenceService's predictor (pod fields) and the runtime's containers
    _restricted(isvc["spec"]["predictor"], runtime["spec"]["containers"], f"InferenceService on {server}")
    for doc in (isvc, runtime):
        validate(doc)


def test_clients_come_from_the_models_namespace_unless_others_are_named() -> None:
    from visionapp.deploy.manifests import other_clients

    for name in ("k8s/networkpolicy.yaml", "kserve/networkpolicy.yaml"):
        (clients, _) = _rendered(name)["spec"]["ingress"]
        assert clients["from"] == [{"podSelector": {"matchLabels": {"classifier-client": "true"}}}], name
        policy = _rendered(name, other_clients=other_clients("classifier", ["ingress-nginx", "apps"]))
        validate(policy)
        (_, elsewhere) = policy["spec"]["ingress"][0]["from"]
        assert elsewhere["namespaceSelector"]["matchExpressions"][0]["values"] == ["ingress-nginx", "apps"]
        assert elsewhere["podSelector"] == {"matchLabels": {"classifier-client": "true"}}
    with pytest.raises(ValueError, match="Bad_NS"):
        other_clients("classifier", ["Bad_NS"])
