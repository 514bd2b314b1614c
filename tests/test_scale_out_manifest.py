"""docs/ray-service.yaml, the KubeRay manifest docs/scale-out.md shows: it parses, its Serve config passes
Ray Serve's own schema, and its application builder loads the deployment with the arguments given."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from sdrt.errors import InvalidInputError

MANIFEST = Path(__file__).resolve().parents[1] / "docs" / "ray-service.yaml"


def test_manifest_parses_and_its_application_config_loads():
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (application,) = config.applications
    module, _, name = application.import_path.partition(":")
    built = getattr(importlib.import_module(module), name)(application.args)
    deployment = built._bound_deployment
    assert deployment.ray_actor_options == {"num_gpus": 1, "num_cpus": 4}
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert built._bound_deployment.init_args[0].limits.max_steps == 150


def test_builder_names_unknown_arguments():
    from sdrt.serve.ray_deployment import build_app
    with pytest.raises(InvalidInputError, match="replica_count"):
        build_app({"replica_count": 2})
