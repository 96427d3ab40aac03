"""The Kubernetes manifests: both overlays build with the real kubectl (kustomize), every
object validates against the Kubernetes schemas (kubernetes-validate, strict), and the parts
that matter are where they must be: probes, drain time, non-root, GPU, the autoscaling metric
and the prometheus-adapter rule that serves it."""

from __future__ import annotations

import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import require
from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33.0"


def build(overlay: str) -> dict[str, dict[str, Any]]:
    built = subprocess.run([require("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(built.stdout) if doc}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_build_and_every_object_validates(overlay: str) -> None:
    objects = build(overlay)
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "ConfigMap"}
    for kind, obj in objects.items():
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)  # raises when invalid
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "dfine-serve", kind


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_pods_drain_run_locked_down_and_are_probed(overlay: str) -> None:
    deployment = build(overlay)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in container["lifecycle"]
    # preStop (5 s) + the drain (REQUEST_TIMEOUT_S 10 + 5) must fit the grace period.
    assert pod["terminationGracePeriodSeconds"] >= 5 + 15 + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in [*pod["containers"], *pod["initContainers"]]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/tmp" in mounts
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DFINE_MODEL_PATH"].startswith("/models/") and env["DFINE_HOST"] == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) == (overlay == "gpu")
    assert env["DFINE_PROVIDERS"] == ("cuda,cpu" if overlay == "gpu" else "cpu")
    service = build(overlay)["Service"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def adapter_rule() -> dict[str, Any]:
    config = yaml.safe_load(build("cpu")["ConfigMap"]["data"]["config.yaml"])
    rule: dict[str, Any] = config["rules"][0]
    return rule


def test_the_hpa_scales_on_the_metric_the_adapter_rule_serves() -> None:
    hpa = build("cpu")["HorizontalPodAutoscaler"]
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("dfine_queue_depth{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule[
        "metricsQuery"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == build("cpu")["Deployment"]["metadata"][
        "name"]
