"""The `cluster:` section of a SILO config: how `silo serve --ray` deploys replicas on a Ray cluster."""

from __future__ import annotations

from pydantic import Field, model_validator

from silo.core.config import StageConfig

# Ray Serve's proxies prefer replicas on their own node while those have room; behind one proxy (the head
# node's) that sends all traffic to one node's replicas, so SILO's deployment turns the preference off
PROXY_ENV = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0"}


class Autoscaling(StageConfig):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)  # Ray Serve scales to keep each replica near this

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class ClusterConfig(StageConfig):
    replicas: int | None = Field(2, ge=1)  # a fixed number of replicas; or give `autoscaling` (and replicas: null)
    autoscaling: Autoscaling | None = None
    replica_cpus: float = Field(1.0, ge=0)  # Ray resources each replica reserves
    replica_gpus: float = Field(0.0, ge=0)
    app: str = "silo"  # the Ray Serve application's name
    namespace: str = "silo"  # the Ray namespace of the store controller
    controller: str = "silo-store-controller"  # the store controller's actor name
    # a replica that has not acknowledged a new generation this long after the controller published it is
    # taken out of rotation (killed; Ray Serve starts a replacement, which loads the current generation)
    rollout_timeout_s: float = Field(60.0, gt=0)
    health_check_period_s: float = Field(2.0, gt=0)  # Ray Serve calls each replica's check_health this often
    # a replica whose store is older than the one on disk for this long fails its health check (replaced)
    stale_grace_s: float = Field(10.0, gt=0)
    proxy_location: str = Field("HeadOnly", pattern="^(HeadOnly|EveryNode)$")  # Ray Serve's proxies

    @model_validator(mode="after")
    def _one_way_to_scale(self):
        if (self.replicas is None) == (self.autoscaling is None):
            raise ValueError("give either replicas (a fixed number) or autoscaling (bounds and a target), not both")
        return self

    def deployment_options(self, max_ongoing: int) -> dict:
        """Ray Serve deployment options for the replicas."""
        out = {"ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
               "max_ongoing_requests": max_ongoing, "health_check_period_s": self.health_check_period_s,
               "health_check_timeout_s": max(30.0, 3 * self.health_check_period_s),
               "graceful_shutdown_timeout_s": 20.0}
        if self.autoscaling is not None:
            a = self.autoscaling
            out["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}
        else:
            out["num_replicas"] = self.replicas
        return out
