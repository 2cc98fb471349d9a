"""cluster/ and deploy/ checked offline against the schemas that will judge them on a real cluster.

- Ray cluster launcher configs: Ray's own ``ray-schema.json`` and its config preparation.
- KubeRay resources: the ray.io/v1 CRD schemas of KubeRay v1.7.0 (../shared/kuberay-crds), made strict
  (unknown fields rejected, as ``kubectl apply --validate=strict`` does) so a misspelt field fails here.
- Kubernetes core objects and every embedded pod template: kubernetes-validate (offline schemas).
- kustomize overlays: rendered with a small renderer of the features the kustomizations use, and with
  ``kubectl kustomize`` as well where it is installed (both must agree).
- The RayService's Serve config: equal to ``serve.schema.serve_config_document`` of the documented
  overrides (deploy/serve_config.py), so the manifest and ``cxr serve`` cannot drift.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(os.environ.get("CXR_SHARED", ROOT.parent / "shared")) / "kuberay-crds"
OVERLAYS = ("cpu", "gpu")
#: the only kustomization keys the renderer below implements (a kustomization using more fails the test)
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches", "configMapGenerator"}
#: GPUs per instance type, to check the launcher configs' declared resources
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8}
K8S_VERSION = "1.32.0"


def _yaml_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*") if p.suffix in (".yaml", ".yml"))


def _locked(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == name)


@cache
def _serve_config_module() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_serve_config", ROOT / "deploy" / "serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ parsing


def test_every_yaml_and_json_in_cluster_and_deploy_parses() -> None:
    files = _yaml_files("cluster", "deploy")
    assert len(files) >= 12, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
    for path in (ROOT / "deploy").rglob("*.json"):
        json.loads(path.read_text())


# ----------------------------------------------------------------------- Ray cluster launcher


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "aws-cpu.yaml"])
def test_cluster_config_passes_rays_schema(name: str) -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching anything

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers.values())
    for t in workers.values():
        gpus = AWS_GPUS.get(t["node_config"]["InstanceType"], 0)
        assert t["resources"].get("GPU", 0) == gpus, t
    # the image runs the Ray version cxr is locked to
    assert config["docker"]["image"].startswith(f"rayproject/ray:{_locked('ray')}-py311")


def test_gpu_cluster_offers_g5_p4d_p5_and_cpu_workers() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    instances = {t["node_config"]["InstanceType"].split(".")[0] for t in config["available_node_types"].values()
                 if t["resources"].get("GPU")}
    assert instances >= {"g5", "p4d", "p5"}
    # every GPU node type holds at least one worker of the gpu preset (its GPU and the CPUs it reserves)
    from cxr.config import resolve_train_config

    preset = resolve_train_config("gpu", {})
    for name, t in config["available_node_types"].items():
        if t["resources"].get("GPU"):
            assert t["resources"]["CPU"] >= preset.cpus_per_worker * t["resources"]["GPU"] >= preset.gpus, name
    assert any(not t["resources"].get("GPU") and t["resources"].get("CPU") for t in config["available_node_types"].values())
    cpu_only = yaml.safe_load((ROOT / "cluster" / "aws-cpu.yaml").read_text())
    assert not any(t["resources"].get("GPU") for t in cpu_only["available_node_types"].values())


# ---------------------------------------------------------------------------------- kustomize


def _apply_json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / replace / remove (what the overlays use)."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            if last == "-":
                assert op["op"] == "add"
                node.append(op["value"])
            elif op["op"] == "add":
                node.insert(int(last), op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
            node[last] = op["value"]


def _walk(doc: Any) -> Any:
    """Every (key, value) of every mapping nested anywhere in ``doc``."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _walk(item)


def _containers(doc: Any) -> list[dict]:
    """Every container anywhere in the document (pod templates nest at different depths)."""
    return [c for key, value in _walk(doc) if key in ("containers", "initContainers") for c in value]


def _pod_templates(doc: Any) -> list[dict]:
    return [v for key, v in _walk(doc) if key == "template" and isinstance(v, dict) and "containers" in v.get("spec", {})]


def _render(directory: Path) -> list[dict]:
    """A kustomize build restricted to KUSTOMIZE_KEYS, in kustomize's order (patches, images, namespace)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZE_KEYS, f"{directory}: the test's renderer does not implement {set(k) - KUSTOMIZE_KEYS}"
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        docs += _render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        opts = gen.get("options", {})
        assert opts.get("disableNameSuffixHash"), "name hashes are not reproduced by the test's renderer"
        data = {}
        for spec in gen["files"]:
            key, _, rel = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (directory / rel).read_text()
        meta = {"name": gen["name"], **({"labels": opts["labels"]} if opts.get("labels") else {})}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for patch in k.get("patches", []):
        target, ops = patch["target"], yaml.safe_load((directory / patch["path"]).read_text())
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
                and d["apiVersion"] == f"{target['group']}/{target['version']}"]
        assert len(hits) == 1, f"patch target {target} matches {len(hits)} resources"
        _apply_json_patch(hits[0], ops)
    for image in k.get("images", []):
        for c in _containers(docs):
            if c["image"].split(":")[0] == image["name"]:
                c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in k:
        for d in docs:
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = k["namespace"]
    return docs


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(_render(ROOT / "deploy" / "overlays" / overlay))


def _one(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{len(hits)} {kind}"
    return hits[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_all_resources(overlay: str) -> None:
    kinds = sorted(d["kind"] for d in rendered(overlay))
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "ConfigMap", "RayJob", "RayCronJob",
                            "RayService", "ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"])
    policy = _one(rendered(overlay), "NetworkPolicy")["spec"]  # the dashboard/Jobs API (code execution) stays inside
    opened = {p["port"] for rule in policy["ingress"] if "from" not in rule for p in rule["ports"]}
    assert opened == {8000} and policy["podSelector"] == {}
    operator = [r for r in policy["ingress"] if any(p["port"] == 8265 for p in r.get("ports", []))]
    assert len(operator) == 1 and operator[0]["from"][0]["podSelector"]["matchLabels"] == {  # or no Serve app deploys
        "app.kubernetes.io/name": "kuberay-operator"}
    images = {c["image"] for c in _containers(list(rendered(overlay)))}
    assert images == {f"ghcr.io/example/cxr:0.1.0-{overlay}"}, images  # no container left on another tag


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    """Where kubectl (which embeds kustomize) is installed, the real build must equal the test's renderer."""
    kubectl = shutil.which("kubectl") or shutil.which("kustomize")
    if kubectl is None:
        pytest.skip("no kubectl/kustomize binary: the test's renderer alone checks the overlays")
    cmd = [kubectl, "kustomize"] if Path(kubectl).name == "kubectl" else [kubectl, "build"]
    out = subprocess.run([*cmd, str(ROOT / "deploy" / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted((d for d in yaml.safe_load_all(out) if d), key=key) == sorted(rendered(overlay), key=key)


# ------------------------------------------------------------------------ schema validation


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected wherever the CRD does not explicitly allow them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Validator:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml.gz"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: the C parser is 10x faster
    crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def test_strict_crd_validation_catches_a_misspelt_field() -> None:
    """The validator is not vacuous: a typo deep in a worker group and a wrong type are both errors."""
    doc = copy.deepcopy(_one(rendered("cpu"), "RayService"))
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    messages = [e.message for e in crd_validator("RayService").iter_errors(doc)]
    assert any("maxReplica" in m for m in messages) and any("'yes' is not of type 'boolean'" in m for m in messages)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayio_resources_validate_against_kuberay_crds(overlay: str) -> None:
    ray_docs = [d for d in rendered(overlay) if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_docs} == {"RayJob", "RayCronJob", "RayService"}
    for doc in ray_docs:
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{doc['kind']} {list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_and_pod_templates_validate_with_kubernetes_validate(overlay: str) -> None:
    import kubernetes_validate

    docs = rendered(overlay)
    core = [d for d in docs if d["apiVersion"] == "v1"]
    assert {d["kind"] for d in core} == {"Namespace", "PersistentVolumeClaim", "ConfigMap"}
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    templates = [t for d in docs if d["apiVersion"] == "ray.io/v1" for t in _pod_templates(d)]
    assert len(templates) >= 6
    for template in templates:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, K8S_VERSION, strict=True)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels + matchExpressions) against an object's labels."""
    ops = {"In": lambda k, v: labels.get(k) in v, "NotIn": lambda k, v: labels.get(k) not in v,
           "Exists": lambda k, v: k in labels, "DoesNotExist": lambda k, v: k not in labels}
    return (all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            and all(ops[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_the_ray_pods_metrics_port(overlay: str) -> None:
    """The Prometheus operator CRDs are not available offline: check what the monitors rely on."""
    docs = rendered(overlay)
    namespace = _one(docs, "Namespace")["metadata"]["name"]
    sm, pm = _one(docs, "ServiceMonitor"), _one(docs, "PodMonitor")
    for mon in (sm, pm):
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert mon["spec"]["namespaceSelector"]["matchNames"] == [namespace]
    assert sm["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}  # labels KubeRay sets
    # KubeRay's head Services (labels as its ray-operator sets them): each RayCluster's own, and the
    # RayService's stable one, which fronts the same head pod on the same ports; scrape the head once
    cluster_head_svc = {"ray.io/cluster": "cxr-raycluster-x7k2p", "ray.io/node-type": "head",
                        "ray.io/identifier": "cxr-raycluster-x7k2p-head", "app.kubernetes.io/name": "kuberay",
                        "app.kubernetes.io/created-by": "kuberay-operator"}
    rayservice_head_svc = {"ray.io/originated-from-cr-name": "cxr", "ray.io/originated-from-crd": "RayService",
                           "ray.io/node-type": "head", "ray.io/identifier": "cxr-head"}
    assert _selects(sm["spec"]["selector"], cluster_head_svc)
    assert not _selects(sm["spec"]["selector"], rayservice_head_svc), "the RayService head Service is scraped twice"
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "worker"}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    from cxr.config import ServeConfig

    for doc in (d for d in docs if d["apiVersion"] == "ray.io/v1"):
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]["jobTemplate"]["rayClusterSpec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["rayStartParams"]["metrics-export-port"] == str(ServeConfig().metrics_port)
            ports = {p["name"]: p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c["ports"]}
            assert ports["metrics"] == ServeConfig().metrics_port


# ------------------------------------------------------------------------ drift with the code


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serve_config_is_serve_config_document(overlay: str) -> None:
    """The embedded serveConfigV2 equals the function `cxr serve` uses, for the documented overrides."""
    from serve.schema import serve_config_document

    sc = _serve_config_module()
    svc = _one(rendered(overlay), "RayService")
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == serve_config_document(sc.serve_config(overlay))
    # and the overrides are what they claim: cluster host, the shared model, GPUs only in the gpu overlay
    cfg = sc.serve_config(overlay)
    assert cfg.host == "0.0.0.0" and cfg.model.startswith("/mnt/cxr/")
    assert (cfg.gpus_per_replica > 0) == (overlay == "gpu")
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"]
                                           for c in g["template"]["spec"]["containers"])]
    assert bool(gpu_groups) == (overlay == "gpu")
    assert svc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # Serve's HTTP port is the pods' `serve` port
    serve_ports = {p["containerPort"] for g in groups for c in g["template"]["spec"]["containers"]
                   for p in c["ports"] if p["name"] == "serve"}
    assert serve_ports == {embedded["http_options"]["port"]}


def test_serve_config_check_script_reports_no_drift() -> None:
    sc = _serve_config_module()
    for variant, path in sc.TARGETS.items():
        assert sc.block(variant, path.read_text()) == path.read_text(), f"run python deploy/serve_config.py ({path})"


def test_drift_is_detected() -> None:
    """Changing the typed config changes the expected document: the comparison above is not vacuous."""
    import dataclasses

    from serve.schema import serve_config_document

    sc = _serve_config_module()
    changed = dataclasses.replace(sc.serve_config("cpu"), max_ongoing_requests=7)
    assert serve_config_document(changed) != yaml.safe_load(_one(rendered("cpu"), "RayService")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_entrypoints_parse_with_the_real_cli(overlay: str) -> None:
    """RayJob / RayCronJob entrypoints use flags `cxr train` / `cxr screen` really have."""
    from ray.runtime_env import RuntimeEnv

    from cxr.cli import main

    for kind in ("RayJob", "RayCronJob"):
        doc = _one(rendered(overlay), kind)
        spec = doc["spec"] if kind == "RayJob" else doc["spec"]["jobTemplate"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[:3] == ["python", "-m", "cxr.cli"], argv
        command = main.commands[argv[3]]
        ctx = command.make_context(argv[3], argv[4:])  # raises on an unknown flag or a bad value
        assert ctx.params
        RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
        assert spec["rayClusterSpec"]["rayVersion"] == _locked("ray")
        if kind == "RayCronJob":  # models/current is swapped under it: refusing would fail every night after
            assert ctx.params["new_model"] == "rescore"
        assert spec["ttlSecondsAfterFinished"] <= 600  # a finished job's idle cluster is not kept for hours


def test_dockerfile_base_image_matches_the_lock() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert base == f"rayproject/ray:{_locked('ray')}-py311-cpu"
    assert "uv export --frozen --no-dev" in text and "--no-deps ." in text
    # an allow-list of what the image needs, the same paths the COPY lines name (a builder without
    # BuildKit ignores the ignore file: the checkout's .venv and data must not ride along either way)
    ignore = [ln for ln in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
              if ln and not ln.startswith("#")]
    allowed = {ln[1:] for ln in ignore if ln.startswith("!")}
    assert ignore[0] == "*" and allowed == {"pyproject.toml", "uv.lock", "README.md", "cxr", "jobs", "serve"}
    copied = set(re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M))
    assert {p for line in copied for p in line.split()} == allowed
    assert all(p in allowed for p in ("cxr", "jobs", "serve")) and "COPY --chown=ray:users . ." not in text


def _assert_series_exist(exprs: list[str]) -> set[str]:
    """Every metric the PromQL ``exprs`` name is defined: by the Serve app, the screening job, or Ray Serve."""
    import ray

    names = {n for e in exprs for n in re.findall(r"\b((?:ray_)?(?:cxr|serve)_[a-z_]+)\b", e)}
    app = (ROOT / "serve" / "app.py").read_text() + (ROOT / "cxr" / "screening.py").read_text()
    serve_src = "".join(p.read_text() for p in (Path(ray.__file__).parent / "serve").rglob("*.py"))
    templates = [re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[a-z]+", re.escape(t)) + "$")
                 for t in re.findall(r'f"(serve_[a-z_{}]+)"', serve_src)]
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base.startswith("ray_cxr_") or base.startswith("cxr_"):
            assert f'"{base.removeprefix("ray_")}"' in app, f"{name}: no such cxr metric"
        else:
            metric = base.removeprefix("ray_").removesuffix("_total")
            assert f'"{metric}"' in serve_src or any(t.match(metric) for t in templates), f"{name}: not a Ray Serve metric"
    return names


def test_grafana_dashboard_queries_only_series_that_exist() -> None:
    dash = json.loads((ROOT / "deploy" / "base" / "grafana" / "cxr-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    names = _assert_series_exist(exprs)
    assert any(n.startswith("ray_cxr_") for n in names) and any(n.startswith("ray_serve_") for n in names)
    assert any(n.startswith("cxr_screen_") for n in names)


def test_alert_rules_are_complete_and_query_only_series_that_exist() -> None:
    """The PrometheusRule: each alert has a severity, a summary and a duration; its series exist; the
    screening alerts cover a missed night (last *success*), a failed run and a lost Pushgateway."""
    rule = _one(rendered("cpu"), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 10 and len({r["alert"] for r in rules}) == len(rules)
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
    names = _assert_series_exist([r["expr"] for r in rules])
    assert {"cxr_screen_last_success_timestamp_seconds", "cxr_screen_success", "ray_cxr_model_info",
            "ray_serve_deployment_replica_healthy", "ray_serve_http_request_latency_ms_bucket"} <= names
    assert any(r["expr"].startswith("absent(cxr_screen_") for r in rules)
