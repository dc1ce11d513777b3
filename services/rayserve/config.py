"""The Ray application's arguments: arserve's own settings plus, for each
service, the options of its deployment. ``serve run`` hands the ``args`` of
``deploy/serve_config.yaml`` to the builder, which validates them here, so a
typo or a bad value fails the deploy with a message naming the field."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..settings import ImageModelSettings, ServiceSettings

SERVICES = ("gateway", "tokenizer", "verifier", "drafter", "backbone", "diffusion_head")
Service = Literal["gateway", "tokenizer", "verifier", "drafter", "backbone", "diffusion_head"]


class ActorOptions(BaseModel):
    """The resources one replica holds (Ray's ``ray_actor_options``)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(..., ge=0, description="Logical CPUs per replica (fractions allowed).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica.")
    memory: int | None = Field(None, gt=0, description="Bytes of memory reserved per replica.")
    resources: dict[str, float] | None = Field(
        None, description="Custom Ray resources per replica, e.g. {'arserve_drafter': 1}: places the "
        "replicas on the nodes (worker groups) that advertise them.")


class Autoscaling(BaseModel):
    """Replica bounds and target load. Load is the number of gRPC calls a
    replica has in flight (it reports them itself: callers reach replicas
    over direct gRPC channels, which Ray's request counting does not see)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Fewest replicas.")
    max_replicas: int = Field(..., ge=1, description="Most replicas.")
    target_inflight: float = Field(4, gt=0, description="Calls in flight per replica to aim for.")
    upscale_delay_s: float = Field(10, ge=0, description="Load must stay high this long before adding a replica.")
    downscale_delay_s: float = Field(120, ge=0, description="Load must stay low this long before removing one.")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self

    def ray_config(self) -> dict:
        return {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_inflight,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": 30.0,
            "policy": {"policy_function": "arserve.rayserve.autoscaling:inflight_policy"},
        }


class DeploymentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Replicas (the starting count when autoscaling is set).")
    ray_actor_options: ActorOptions
    autoscaling: Autoscaling | None = Field(None, description="Scale between bounds on load; None: fixed count.")
    torch_threads: int | None = Field(None, gt=0, description="torch intra-op threads of each replica's "
                                      "compute thread (arserve.core.compute; default: Ray's whole CPUs, at "
                                      "least 1).")

    def threads(self) -> int:
        """Each replica's torch threads: ``torch_threads``, else its whole CPUs (at least 1)."""
        return self.torch_threads or max(1, int(self.ray_actor_options.num_cpus))

    def ray_options(self) -> dict:
        """The keyword arguments of ``Deployment.options``. A replica with
        more torch threads than its CPU share shares its cores with other
        replicas: its OpenMP workers then sleep between parallel regions
        (``OMP_WAIT_POLICY=PASSIVE``) rather than spin on cores that other
        replicas' work needs (arserve.core.compute, docs/decisions.md 40)."""
        out: dict = {"ray_actor_options": self.ray_actor_options.model_dump(exclude_none=True),
                     # Ray Serve handles and its proxy reach only the gateway; internal calls are
                     # direct gRPC, so this bounds only proxy calls per gateway replica.
                     "max_ongoing_requests": 1024}
        if self.threads() > max(1.0, self.ray_actor_options.num_cpus):
            out["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
        if self.autoscaling:
            out["autoscaling_config"] = {**self.autoscaling.ray_config(), "initial_replicas": self.num_replicas}
        else:
            out["num_replicas"] = self.num_replicas
        return out


def _defaults() -> dict[str, DeploymentOptions]:
    """Sized for one small machine, as ``deploy/serve_config.yaml``: one
    replica of each fits a 2-CPU node (2.0 CPUs in all; a replica that does
    not fit is never scheduled). A cluster sets its own in the config."""
    cpus = {"gateway": 0.1, "tokenizer": 0.1, "verifier": 0.2, "drafter": 0.2, "backbone": 1.0,
            "diffusion_head": 0.4}
    threads = {"drafter": 1, "backbone": 2, "diffusion_head": 1}
    return {name: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=c), torch_threads=threads.get(name))
            for name, c in cpus.items()}


class AppArgs(ServiceSettings):
    """``args`` of the application in the serve config: arserve's settings
    (as for the embedded server) and per-service deployment options. The
    public port is Ray's (``grpc_options.port`` in the serve config)."""

    deployments: dict[Service, DeploymentOptions] = Field(
        default_factory=_defaults, description="Options per service; services left out keep their defaults.")
    grpc_bind_host: str | None = Field(
        None, description="Where each replica's internal gRPC server binds; None: the node's address "
        "(ray.util.get_node_ip_address(), the pod IP on Kubernetes), which is also the address announced. "
        "0.0.0.0 binds every interface (the node's address is still announced).")
    image_models: list[ImageModelSettings] = Field(
        default_factory=list, description="Served continuous-token image models (GenerateImage); the first is "
        "the default. Their targets live in the backbone deployment, their drafts in the drafter, their heads in "
        "the diffusion_head deployment (which exists only when this list is not empty). [] serves none.")

    @model_validator(mode="after")
    def _fill_deployments(self) -> "AppArgs":
        self.deployments = {**_defaults(), **self.deployments}
        self._devices_agree()
        return self

    def _devices_agree(self) -> None:
        """Each model-holding deployment's GPUs and its models' devices agree.
        Ray gives a replica with num_gpus the GPUs it reserved as cuda:0..
        (CUDA_VISIBLE_DEVICES, Ray's GPU support), so a model on cuda needs a
        deployment with num_gpus > 0 (a fraction shares one GPU: the drafter
        beside the backbone), cuda:N needs N < num_gpus, and a GPU reserved
        for models that all run on cpu is a GPU wasted."""
        from ..drafter.registry import method_spec

        held = {"backbone": [*self.decoded_by("arserve"), *self.image_models],
                "drafter": [m for m in self.decoded_by("arserve")
                            if any(method_spec(x).drafts for x in m.speculative_methods)]
                + [m for m in self.image_models if m.draft_checkpoint],
                "diffusion_head": list(self.image_models)}
        for service, models in held.items():
            gpus = self.deployments[service].ray_actor_options.num_gpus
            for m in models:
                index = int(m.device.partition(":")[2] or 0)
                if m.device.startswith("cuda") and gpus == 0:
                    raise ValueError(f"model {m.id!r} has device {m.device!r} but deployment {service!r} has "
                                     f"ray_actor_options.num_gpus 0: give {service} GPUs (num_gpus: 1, or a "
                                     f"fraction to share one) or set the model's device to cpu")
                if m.device.startswith("cuda") and index >= max(1, math.ceil(gpus)):
                    raise ValueError(f"model {m.id!r} has device {m.device!r} but deployment {service!r} reserves "
                                     f"num_gpus {gpus}: a replica sees its GPUs as cuda:0..cuda:"
                                     f"{max(1, math.ceil(gpus)) - 1}")
            if gpus > 0 and models and not any(m.device.startswith("cuda") for m in models):
                raise ValueError(f"deployment {service!r} has ray_actor_options.num_gpus {gpus} but its models "
                                 f"{[m.id for m in models]} have device cpu: set their device to cuda or num_gpus 0")

    def reserved(self, services: list[str]) -> dict[str, float]:
        """The CPUs and GPUs the starting replicas of ``services`` reserve:
        what a Ray cluster must have for every replica to be scheduled."""
        total = {"CPU": 0.0, "GPU": 0.0}
        for name in services:
            d = self.deployments[name]
            replicas = d.num_replicas  # the starting count (autoscaling's initial_replicas too)
            total["CPU"] += replicas * d.ray_actor_options.num_cpus
            total["GPU"] += replicas * d.ray_actor_options.num_gpus
        return total

    def deployment_options(self) -> dict[str, dict]:
        """Service -> ``Deployment.options`` keyword arguments."""
        return {name: self.deployments[name].ray_options() for name in SERVICES}
