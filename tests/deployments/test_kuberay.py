"""k8s/rayservice.yaml is generated from serve_config.yaml, valid for Ray, and names only what the app has."""

from __future__ import annotations

import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs, build_app
from deployments.kuberay import ROOT, main, merge, serve_config_for_k8s


def app_deployments(app: Application) -> dict[str, object]:
    """Every deployment in the application graph, by name."""
    found, pending = {}, [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        found[deployment.name] = deployment
        for arg in (*deployment.init_args, *deployment.init_kwargs.values()):
            values = arg.values() if isinstance(arg, dict) else [arg]
            pending += [a for a in values if isinstance(a, Application)]
    return found


def manifest() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "rayservice.yaml").read_text())


def test_manifest_is_up_to_date():
    assert main(["--check"]) == 0, "run `acestep-rayservice` and commit k8s/rayservice.yaml"


def test_manifest_shape():
    doc = manifest()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert doc["spec"]["upgradeStrategy"]["type"] == "None"
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["gcsFaultToleranceOptions"]["redisAddress"]


def test_serve_config_v2_is_the_generated_config_and_valid():
    embedded = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    assert embedded == serve_config_for_k8s()
    for config in (embedded, yaml.safe_load((ROOT / "serve_config.yaml").read_text())):
        schema = ServeDeploySchema.model_validate(config)
        [application] = schema.applications
        AppArgs.model_validate(application.args)  # our own builder accepts the args too


def test_every_configured_deployment_exists_in_the_app():
    for config in (serve_config_for_k8s(), yaml.safe_load((ROOT / "serve_config.yaml").read_text())):
        [application] = config["applications"]
        args = application["args"]  # the weights volume exists only in the pod: build the same graph on the preset
        graph = app_deployments(build_app({**args, "model": {**args["model"], "checkpoint_dir": None},
                                           "lm": {**args["lm"], "checkpoint_dir": None}}))
        assert {d["name"] for d in application["deployments"]} == set(graph)
        assert application["import_path"] == "deployments.app:build_app"


def test_worker_groups_can_host_every_replica():
    config, cluster = serve_config_for_k8s(), manifest()["spec"]["rayClusterConfig"]
    groups = [(float(g["rayStartParams"].get("num-cpus", 0)), float(g["rayStartParams"].get("num-gpus", 0)),
               g["template"]["spec"]["containers"][0]) for g in cluster["workerGroupSpecs"]]
    for deployment in config["applications"][0]["deployments"]:
        options = deployment.get("ray_actor_options", {})
        cpus, gpus = options.get("num_cpus", 1), options.get("num_gpus", 0)
        hosts = [c for c_cpu, c_gpu, c in groups if c_cpu >= cpus and c_gpu >= gpus]
        assert hosts, f"no worker group fits {deployment['name']}"
        if gpus:
            assert all(c["resources"]["limits"]["nvidia.com/gpu"] for c in hosts)
    mounts = {m["mountPath"] for _, _, c in groups for m in c["volumeMounts"]}
    files = config["applications"][0]["args"]["files"]
    for path in (files["output_dir"], files["upload_dir"], *files["allowed_input_dirs"]):
        assert any(path.startswith(m + "/") for m in mounts), path
    assert config["applications"][0]["args"]["model"]["checkpoint_dir"].startswith("/models/")


def test_merge_matches_lists_by_name_and_null_removes():
    base = {"a": [{"name": "x", "n": 1, "k": 2}, {"name": "y"}], "b": 1}
    assert merge(base, {"a": [{"name": "x", "k": None, "m": 3}, {"name": "z"}], "b": None}) == {
        "a": [{"name": "x", "n": 1, "m": 3}, {"name": "y"}, {"name": "z"}]}
