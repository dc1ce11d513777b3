"""The Ray application's configuration: the shipped serve config validates,
each service's options stand alone, and mistakes name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from arserve.rayserve.app import deployed
from arserve.rayserve.autoscaling import desired_replicas
from arserve.rayserve.config import SERVICES, AppArgs
from arserve.rayserve.directory import Directory
from arserve.rayserve.run import load_serve_config
from arserve.settings import ImageModelSettings

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"


def app_args(raw: dict) -> dict:
    return next(a for a in raw["applications"] if a["name"] == "arserve")["args"]


def test_the_shipped_serve_config_validates():
    args, port = load_serve_config(CONFIG)
    assert port == 9000
    options = args.deployment_options()
    assert set(options) == set(SERVICES)
    assert options["backbone"]["autoscaling_config"]["max_replicas"] == 4
    assert options["backbone"]["autoscaling_config"]["policy"]["policy_function"].endswith(":inflight_policy")
    assert options["drafter"]["num_replicas"] == 1


def test_the_shipped_config_fits_a_two_cpu_node():
    """`serve run deploy/serve_config.yaml` on a 2-CPU machine (this
    project's class): every deployment's starting replicas fit in 2 logical
    CPUs. At 2.5 the diffusion head was never scheduled and every image
    request failed with UNAVAILABLE (seen with the literal `serve run`)."""
    args, _ = load_serve_config(CONFIG)
    need = 0.0
    for name, options in args.deployment_options().items():
        replicas = options.get("autoscaling_config", {}).get("min_replicas", options.get("num_replicas", 1))
        need += replicas * options["ray_actor_options"].get("num_cpus", 1)
    assert need <= 2.0, need
    assert args.reserved(deployed(args)) == {"CPU": need, "GPU": 0.0}


def test_the_default_deployments_fit_a_two_cpu_node_and_a_local_ray_too_small_is_refused_at_once(monkeypatch):
    """`arserve serve --ray` with no config: at 2.25 CPUs its replicas waited
    for a third CPU forever on a 2-CPU machine, the log saying only that
    replicas were not scheduled."""
    from arserve.rayserve import run

    args = AppArgs(image_models=[ImageModelSettings.named("digits")])
    assert deployed(args) == ["gateway", "tokenizer", "verifier", "backbone", "drafter", "diffusion_head"]
    assert args.reserved(deployed(args))["CPU"] <= 2.0
    monkeypatch.setattr(run.ray, "cluster_resources", lambda: {"CPU": 1.0})
    ours = run.RayServer(args)
    ours._started_ray = True  # the local Ray this server started
    with pytest.raises(ValueError, match=r"need 2 CPUs, the Ray cluster has 1 .*backbone 1"):
        ours._check_fits()
    run.RayServer(args)._check_fits()  # a Ray the caller started: nodes may join (a warning)
    run.RayServer(args, address="ray://head:10001")._check_fits()  # a cluster: nodes may join (a warning)


def test_the_start_says_where_autoscaling_may_ask_for_more_cpus_than_the_local_ray_has(monkeypatch, caplog):
    """The shipped config on a 2-CPU machine: under load the backbone upscaled to a replica that could
    never be placed, and `serve status` said UPSCALING for minutes with nothing at start to say why."""
    from arserve.rayserve import run

    args, _ = load_serve_config(CONFIG)
    monkeypatch.setattr(run.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with caplog.at_level("WARNING", logger="arserve"):
        run.RayServer(args)._check_fits()
    ceiling = args.deployments["backbone"].autoscaling.max_replicas
    assert f"backbone may scale to {ceiling} replicas of 1 CPUs; this Ray has 2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="arserve"):
        run.RayServer(args, address="ray://head:10001")._check_fits()  # a cluster: nodes may join
    assert "may scale to" not in caplog.text


@pytest.mark.parametrize("service", ["drafter", "diffusion_head"])
def test_changing_one_services_replicas_changes_nothing_else(service):
    raw = yaml.safe_load(CONFIG.read_text())
    before = AppArgs.model_validate(app_args(raw)).deployment_options()
    changed = copy.deepcopy(raw)
    options = app_args(changed)["deployments"][service]
    options.pop("autoscaling", None)
    options["num_replicas"] = 3
    after = AppArgs.model_validate(app_args(changed)).deployment_options()
    assert after[service]["num_replicas"] == 3
    assert {k: v for k, v in after.items() if k != service} == {k: v for k, v in before.items() if k != service}
    assert {k: v for k, v in after[service].items() if k not in ("num_replicas", "autoscaling_config")} == \
        {k: v for k, v in before[service].items() if k not in ("num_replicas", "autoscaling_config")}


def test_the_shipped_config_serves_the_image_model_with_its_own_head_deployment():
    from arserve.rayserve.app import drafting, image_drafting

    args, _ = load_serve_config(CONFIG)
    assert [m.id for m in args.image_models] == ["digits-mar"] and image_drafting(args) and drafting(args)
    head = args.deployment_options()["diffusion_head"]
    assert head["autoscaling_config"]["max_replicas"] == 4 and head["ray_actor_options"]["num_cpus"] == 0.4
    assert args.deployments["diffusion_head"].torch_threads == 1


@pytest.mark.parametrize("change, field", [
    ({"deployments": {"drafter": {"num_replicas": 0, "ray_actor_options": {"num_cpus": 1}}}}, "num_replicas"),
    ({"deployments": {"drafer": {"ray_actor_options": {"num_cpus": 1}}}}, "deployments.drafer"),
    ({"deployments": {"backbone": {"ray_actor_options": {"num_cpus": 1},
                                   "autoscaling": {"min_replicas": 3, "max_replicas": 2}}}}, "max_replicas"),
    ({"redis_url": 5}, "redis_url"),
    ({"kv_block_size": -1}, "kv_block_size"),
])
def test_bad_fields_are_named(change, field):
    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate(change)
    assert field in str(e.value)


def test_left_out_services_keep_their_defaults():
    args = AppArgs.model_validate({"deployments": {"backbone": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 2}}}})
    assert args.deployments["backbone"].num_replicas == 2
    assert args.deployments["drafter"].ray_actor_options.num_cpus == 0.2


def test_autoscaling_asks_for_enough_replicas_for_the_reported_load():
    assert desired_replicas([8, 8, 9], current=3, target=4) == 7
    assert desired_replicas([0, 0], current=2, target=4) == 1
    assert desired_replicas([], current=2, target=4) == 2  # nothing reported yet: stay


def test_directory_forgets_replicas_that_stop_announcing(monkeypatch):
    import arserve.rayserve.directory as d

    now = [100.0]
    monkeypatch.setattr(d.time, "monotonic", lambda: now[0])
    directory = Directory("s3cret")
    key = d.directory_key("s3cret")

    def announce(replica, address):
        directory.announce("backbone", replica, address, *d.signed(key, "announce", "backbone", replica, address))

    announce("a", "10.0.0.1:5000")
    announce("b", "10.0.0.2:5000")
    assert directory.addresses("backbone") == ["10.0.0.1:5000", "10.0.0.2:5000"]
    now[0] += d.EXPIRY_S / 2
    announce("b", "10.0.0.2:5000")
    now[0] += d.EXPIRY_S / 2 + 0.1
    assert directory.addresses("backbone") == ["10.0.0.2:5000"]
    directory.withdraw("backbone", "b", *d.signed(key, "withdraw", "backbone", "b"))
    assert directory.addresses("backbone") == []


def test_directory_refuses_forged_stale_and_replayed_announcements(caplog):
    import time

    import arserve.rayserve.directory as d
    from arserve.errors import Unauthenticated

    directory = Directory("s3cret")
    key = d.directory_key("s3cret")
    fake = ("backbone", "evil", "10.6.6.6:1")
    forged = [
        (*fake, *d.signed(d.directory_key("guessed"), "announce", *fake)),  # another secret
        (*fake, time.time(), "0" * 64),  # no key at all
        (*fake, *d.signed(key, "announce", "backbone", "evil", "10.6.6.6:2")),  # signed for another address
        (*fake, *d.signed(key, "withdraw", *fake)),  # signed for another action
    ]
    stale_at = time.time() - d.SIGNED_WITHIN_S - 5
    forged.append((*fake, stale_at, d.signature(key, "announce", stale_at, *fake)))
    with caplog.at_level("WARNING", logger="arserve.rayserve"):
        for args in forged:
            with pytest.raises(Unauthenticated, match="refused"):
                directory.announce(*args)
    assert directory.addresses("backbone") == []
    assert directory.refused == len(forged)
    assert sum("refused a" in r.message for r in caplog.records) == len(forged)
    directory.announce(*fake, *d.signed(key, "announce", *fake))  # the real key: listed
    assert directory.addresses("backbone") == ["10.6.6.6:1"]
    with pytest.raises(Unauthenticated):  # withdrawals are signed too
        directory.withdraw("backbone", "evil", time.time(), "0" * 64)
    assert directory.addresses("backbone") == ["10.6.6.6:1"]


def test_the_internal_secret_is_never_the_public_token():
    with pytest.raises(ValidationError, match="internal_secret must differ from auth_token"):
        AppArgs.model_validate({"auth_token": "same", "internal_secret": "same"})


def test_redis_url_can_come_from_the_environment(monkeypatch):
    args = AppArgs.model_validate({"redis_url": "env:ARSERVE_TEST_REDIS"})
    with pytest.raises(ValueError, match="ARSERVE_TEST_REDIS is not set"):
        args.resolved_redis_url()
    monkeypatch.setenv("ARSERVE_TEST_REDIS", "redis://:pw@redis:6379/0")
    assert args.resolved_redis_url() == "redis://:pw@redis:6379/0"
    with pytest.raises(ValidationError, match="redis_url must start with"):
        AppArgs.model_validate({"redis_url": "http://redis:6379"})


def gpu_args(device: str, backbone_gpus: float, drafter_gpus: float) -> dict:
    opts = lambda g: {"ray_actor_options": {"num_cpus": 1, "num_gpus": g}}  # noqa: E731
    return {"models": [{"id": "m", "device": device}],
            "deployments": {"backbone": opts(backbone_gpus), "drafter": opts(drafter_gpus)}}


def test_model_devices_and_deployment_gpus_agree():
    # the drafter on a quarter of the backbone's GPU: fine
    args = AppArgs.model_validate(gpu_args("cuda", 1, 0.25))
    assert args.models[0].dtype == "bfloat16"
    assert args.deployment_options()["drafter"]["ray_actor_options"]["num_gpus"] == 0.25
    AppArgs.model_validate(gpu_args("cpu", 0, 0))
    for change, words in [
        (gpu_args("cuda", 0, 0.25), ["model 'm' has device 'cuda'", "deployment 'backbone'", "num_gpus 0"]),
        (gpu_args("cuda", 1, 0), ["model 'm' has device 'cuda'", "deployment 'drafter'", "num_gpus 0"]),
        (gpu_args("cuda:1", 1, 1), ["device 'cuda:1'", "num_gpus 1", "cuda:0..cuda:0"]),
        (gpu_args("cpu", 1, 0), ["deployment 'backbone' has ray_actor_options.num_gpus 1", "device cpu"]),
    ]:
        with pytest.raises(ValidationError) as e:
            AppArgs.model_validate(change)
        assert all(w in str(e.value) for w in words), (words, str(e.value))


def test_replicas_with_more_torch_threads_than_cpus_let_their_openmp_workers_sleep():
    """Two backbone replicas of 2 torch threads on half a CPU each share
    the cores: spinning OpenMP workers would take them from each other (the
    Ray tests ran 4-5x slower). Replicas that own their cores spin."""
    from arserve.rayserve.config import DeploymentOptions

    shared = DeploymentOptions.model_validate({"ray_actor_options": {"num_cpus": 0.5}, "torch_threads": 2})
    owned = DeploymentOptions.model_validate({"ray_actor_options": {"num_cpus": 2}, "torch_threads": 2})
    single = DeploymentOptions.model_validate({"ray_actor_options": {"num_cpus": 0.1}, "torch_threads": 1})
    assert shared.ray_options()["ray_actor_options"]["runtime_env"] == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert "runtime_env" not in owned.ray_options()["ray_actor_options"]
    assert "runtime_env" not in single.ray_options()["ray_actor_options"]
    assert (shared.threads(), owned.threads(), single.threads()) == (2, 2, 1)


def test_credentials_lose_the_newline_of_the_file_they_came_from(monkeypatch):
    # a secret from `kubectl create secret --from-file` keeps the file's newline: clients' tokens are compared
    # without surrounding whitespace, so a configured token with it matched no client
    monkeypatch.setenv("ARSERVE_TEST_TOKEN", "s3cret-token\n")
    args = AppArgs.model_validate({"auth_token": "env:ARSERVE_TEST_TOKEN", "internal_secret": "a pass phrase\n"})
    assert args.resolved_auth_token() == "s3cret-token"
    # the internal secret only derives keys: kept as is, so running replicas and stored KV blocks still agree
    assert args.resolved_internal_secret() == "a pass phrase\n"
    assert AppArgs.model_validate({"auth_token": "tok\n"}).auth_token == "tok"
    assert AppArgs.model_validate({"auth_token": ""}).auth_token is None  # no authentication, as before
    monkeypatch.setenv("ARSERVE_TEST_TOKEN", " \n")
    with pytest.raises(ValueError, match="ARSERVE_TEST_TOKEN is not set"):
        args.resolved_auth_token()
    for bad in ("two words", "tab\there", "bell\x07"):
        with pytest.raises(ValidationError, match="auth_token must be printable text without spaces"):
            AppArgs.model_validate({"auth_token": bad})


def test_a_callers_error_is_an_info_line_and_a_servers_fault_keeps_its_error_and_traceback():
    """The filter on Ray Serve's "Request failed." records, in the gateway replicas and Ray's proxy (Ray
    logs every exception a deployment raises as an ERROR with its traceback, in both)."""
    import logging
    import sys

    import grpc

    from arserve.errors import InvalidArgument, from_status
    from arserve.rayserve.logs import CallersErrorsAsInfo

    def record(e: BaseException) -> logging.LogRecord:
        try:
            raise e
        except BaseException:  # noqa: BLE001
            return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None, sys.exc_info())

    callers = record(InvalidArgument("sampling.top_p must be in (0, 1], got 1.5"))
    assert CallersErrorsAsInfo().filter(callers) and callers.levelno == logging.INFO and callers.exc_info is None
    assert callers.getMessage() == "Request failed. INVALID_ARGUMENT: sampling.top_p must be in (0, 1], got 1.5"
    internal = grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    "internal token mismatch")  # replicas that disagree on the secret
    left = record(GeneratorExit())  # Ray's proxy, when the client closes a stream
    assert CallersErrorsAsInfo().filter(left) and left.levelno == logging.INFO and left.exc_info is None
    assert left.getMessage() == "Request failed. the client closed its call"
    relayed = from_status("NOT_FOUND", "model 'x' is not served by this backbone")  # another service's status
    other = record(GeneratorExit())
    other.msg = "Replica shutdown failed."  # not a request's record: a real fault, whatever its exception
    for fault in (record(internal), record(RuntimeError("a bug")), record(relayed), other):
        assert CallersErrorsAsInfo().filter(fault) and fault.levelno == logging.ERROR and fault.exc_info
