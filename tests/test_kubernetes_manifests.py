"""The Kubernetes manifests (deploy/kubernetes/), checked offline: no cluster, no network.

- Built-in kinds are validated with kubernetes-validate against the OpenAPI schemas of
  Kubernetes K8S_VERSION, in strict mode: an unknown field (a typo) fails.
- The custom kinds (agent-sandbox's SandboxTemplate and SandboxWarmPool, KubeRay's RayCluster)
  have no schema there. Their embedded pod templates are validated as a v1 PodTemplate (and the
  SandboxTemplate's network rules as a NetworkPolicy's, their metadata as ObjectMeta), and their
  own fields are checked against the field names of those projects' Go types (json tags),
  written out below: extensions.agents.x-k8s.io/v1beta1 as of agent-sandbox 2fd412d5 (2026-08),
  ray.io/v1 as of KubeRay feeaf72f (2026-08).
- Then what ties the files to this repository: every image is one scripts/build-images.sh
  builds (kernel pods the kernel image, every other pod its `local` variant, with bubblewrap and
  Ray pinned to the RayCluster's rayVersion), every KERNELBOX_* name is a setting
  (service/settings.py) or, for kernel pods, one of kernel_boot.py's, probes name routes and
  ports that exist, selectors select something, the kernel pod's arguments and its readiness
  probe work with a real kernel (kernel_boot.py, run here with the manifest's own arguments).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# kubernetes-validate ships schemas per minor version; 1.33 is the floor the manifests need
# (hostUsers for user namespaces, appArmorProfile, procMount with user namespaces).
K8S_VERSION = "1.33"

BUILTIN_API_VERSIONS = {
    "v1",
    "apps/v1",
    "policy/v1",
    "networking.k8s.io/v1",
    "node.k8s.io/v1",
    "rbac.authorization.k8s.io/v1",
}
CLUSTER_SCOPED = {"Namespace", "RuntimeClass"}
NAMESPACE = "kernelbox"

# -- the custom kinds' fields, from their Go types --------------------------------------------
AGENT_SANDBOX = "extensions.agents.x-k8s.io/v1beta1"
KUBERAY = "ray.io/v1"
CUSTOM_KINDS = {"SandboxTemplate": AGENT_SANDBOX, "SandboxWarmPool": AGENT_SANDBOX}
CUSTOM_KINDS["RayCluster"] = KUBERAY
TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec"}  # status is the controller's

# extensions/api/v1beta1/sandboxtemplate_types.go: SandboxTemplateSpec (SandboxBlueprint
# inline: podTemplate, volumeClaimTemplates, service; api/v1beta1/sandbox_types.go).
SANDBOX_TEMPLATE_SPEC = {
    "podTemplate",
    "volumeClaimTemplates",
    "service",
    "networkPolicy",
    "networkPolicyManagement",
    "envVarsInjectionPolicy",
    "volumeClaimTemplatesPolicy",
}
SANDBOX_POD_TEMPLATE = {"spec", "metadata"}  # PodTemplate
SANDBOX_POD_METADATA = {"labels", "annotations"}  # PodMetadata
SANDBOX_NETWORK_POLICY = {"ingress", "egress"}  # NetworkPolicySpec
SANDBOX_ENUMS = {
    "networkPolicyManagement": {"Managed", "Unmanaged"},
    "envVarsInjectionPolicy": {"Allowed", "Overrides", "Disallowed"},
    "volumeClaimTemplatesPolicy": {"Disallowed", "Allowed", "Overrides"},
}
# extensions/api/v1beta1/sandboxwarmpool_types.go
WARM_POOL_SPEC = {"replicas", "sandboxTemplateRef", "updateStrategy"}
WARM_POOL_UPDATE_TYPES = {"Recreate", "OnReplenish"}

# ray-operator/apis/ray/v1/raycluster_types.go
RAY_CLUSTER_SPEC = {
    "upgradeStrategy",
    "authOptions",
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "historyServerOptions",
    "networkPolicy",
    "tlsOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
RAY_HEAD_GROUP = {
    "template",
    "headService",
    "enableIngress",
    "ingressOptions",
    "resources",
    "labels",
    "rayStartParams",
    "serviceType",
}
RAY_WORKER_GROUP = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "priority",
    "resources",
    "labels",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
RAY_CLIENT_PORT = 10001  # KubeRay's DefaultClientPort

# Settings the Ray mode adds (the other half of issue 18), used here before they exist.
RAY_MODE_ENV = {"KERNELBOX_CLUSTER", "KERNELBOX_RAY_ADDRESS"}


# -- loading ---------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(DEPLOY)), doc))
    return docs


DOCS = load_docs()
OBJECTS = [(where, doc) for where, doc in DOCS if doc.get("kind") != "Kustomization"]


def label(where: str, doc: dict) -> str:
    return f"{where}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in OBJECTS if doc["kind"] == kind]


def one(kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


# -- validation (also used on broken copies, to show it catches them) ------------------------


def validate_builtin(doc: dict) -> None:
    """kubernetes-validate, strict: raises kubernetes_validate.ValidationError."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_pod_template(template: dict) -> None:
    """A PodTemplateSpec (metadata + spec), validated as the template of a v1 PodTemplate."""
    validate_builtin(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    )


def brief(exc: kubernetes_validate.ValidationError) -> str:
    """Where and what, without the whole offending object jsonschema's message carries."""
    where = ".".join(str(part) for part in exc.absolute_path)
    return f"{where}: {exc.message}" if where else exc.message


def check_keys(errors: list[str], where: str, obj: Any, allowed: set, required=()) -> None:
    if not isinstance(obj, dict):
        errors.append(f"{where}: not a mapping")
        return
    if unknown := sorted(set(obj) - set(allowed)):
        errors.append(f"{where}: unknown field(s) {unknown}")
    if missing := sorted(set(required) - set(obj)):
        errors.append(f"{where}: missing {missing}")


def embedded_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod template in a custom object."""
    spec = doc.get("spec", {})
    if doc["kind"] == "SandboxTemplate":
        return [("spec.podTemplate", spec.get("podTemplate", {}))]
    if doc["kind"] == "RayCluster":
        found = [("spec.headGroupSpec.template", spec.get("headGroupSpec", {}).get("template"))]
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            found.append((f"spec.workerGroupSpecs[{i}].template", group.get("template")))
        return [(w, t) for w, t in found if t is not None]
    return []


def check_string_map(errors: list[str], where: str, value: Any) -> None:
    """KubeRay's map[string]string fields: a YAML number or boolean there is rejected."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        errors.append(f"{where}: must map names to strings (quote numbers and booleans)")


def custom_errors(doc: dict) -> list[str]:
    """What is wrong with a custom object: its apiVersion, its own fields, and (through
    kubernetes-validate) its metadata and embedded pod templates. [] when nothing is."""
    kind, errors = doc.get("kind"), []
    if doc.get("apiVersion") != CUSTOM_KINDS.get(kind):
        return [f"{kind}: apiVersion {doc.get('apiVersion')!r}, expected {CUSTOM_KINDS.get(kind)}"]
    check_keys(errors, kind, doc, TOP_LEVEL, required={"apiVersion", "kind", "metadata", "spec"})
    try:  # ObjectMeta, strictly: as a ConfigMap's
        meta = doc.get("metadata", {})
        validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"{kind}.metadata: {brief(exc)}")
    spec = doc.get("spec", {})

    if kind == "SandboxTemplate":
        check_keys(errors, "spec", spec, SANDBOX_TEMPLATE_SPEC, required={"podTemplate"})
        template = spec.get("podTemplate", {})
        check_keys(errors, "spec.podTemplate", template, SANDBOX_POD_TEMPLATE, required={"spec"})
        meta = template.get("metadata", {})
        check_keys(errors, "spec.podTemplate.metadata", meta, SANDBOX_POD_METADATA)
        for field, values in SANDBOX_ENUMS.items():
            if field in spec and spec[field] not in values:
                errors.append(f"spec.{field}: {spec[field]!r} is not one of {sorted(values)}")
        if "service" in spec and not isinstance(spec["service"], bool):
            errors.append("spec.service: must be a boolean")
        if "networkPolicy" in spec:
            policy = spec["networkPolicy"]
            check_keys(errors, "spec.networkPolicy", policy, SANDBOX_NETWORK_POLICY)
            try:  # the rules are networking/v1's own types
                validate_builtin(
                    {
                        "apiVersion": "networking.k8s.io/v1",
                        "kind": "NetworkPolicy",
                        "metadata": {"name": "t"},
                        "spec": {"podSelector": {}, **policy},
                    }
                )
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"spec.networkPolicy: {brief(exc)}")
    elif kind == "SandboxWarmPool":
        check_keys(errors, "spec", spec, WARM_POOL_SPEC, required={"sandboxTemplateRef"})
        check_keys(
            errors,
            "spec.sandboxTemplateRef",
            spec.get("sandboxTemplateRef", {}),
            {"name"},
            {"name"},
        )
        replicas = spec.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            errors.append(f"spec.replicas: {replicas!r} is not an integer >= 0")
        if "updateStrategy" in spec:
            strategy = spec["updateStrategy"]
            check_keys(errors, "spec.updateStrategy", strategy, {"type"})
            if strategy.get("type", "OnReplenish") not in WARM_POOL_UPDATE_TYPES:
                errors.append(f"spec.updateStrategy.type: {strategy.get('type')!r}")
    elif kind == "RayCluster":
        check_keys(errors, "spec", spec, RAY_CLUSTER_SPEC, required={"headGroupSpec"})
        head = spec.get("headGroupSpec", {})
        check_keys(errors, "spec.headGroupSpec", head, RAY_HEAD_GROUP, required={"template"})
        for field in ("rayStartParams", "resources", "labels"):
            if field in head:
                check_string_map(errors, f"spec.headGroupSpec.{field}", head[field])
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            where = f"spec.workerGroupSpecs[{i}]"
            required = {"groupName", "minReplicas", "maxReplicas", "template"}
            check_keys(errors, where, group, RAY_WORKER_GROUP, required=required)
            for field in ("rayStartParams", "resources", "labels"):
                if field in group:
                    check_string_map(errors, f"{where}.{field}", group[field])
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            if not low <= group.get("replicas", low) <= high:
                errors.append(f"{where}: replicas outside minReplicas..maxReplicas")

    for where, template in embedded_pod_templates(doc):
        try:
            validate_pod_template(template)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {brief(exc)}")
    return errors


# -- every document ---------------------------------------------------------------------------


def test_there_are_manifests_of_every_part():
    kinds = {doc["kind"] for _, doc in OBJECTS}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "RuntimeClass",
        "SandboxTemplate",
        "SandboxWarmPool",
        "RayCluster",
    } <= kinds


@pytest.mark.parametrize(
    "where,doc",
    [(w, d) for w, d in OBJECTS if d.get("apiVersion") in BUILTIN_API_VERSIONS],
    ids=lambda v: v if isinstance(v, str) else v.get("kind"),
)
def test_builtin_kinds_validate_strictly(where, doc):
    try:
        validate_builtin(doc)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{label(where, doc)}: {brief(exc)}")


@pytest.mark.parametrize(
    "where,doc",
    [(w, d) for w, d in OBJECTS if d.get("apiVersion") not in BUILTIN_API_VERSIONS],
    ids=lambda v: v if isinstance(v, str) else v.get("kind"),
)
def test_custom_kinds_have_known_fields_and_valid_pod_templates(where, doc):
    assert doc.get("kind") in CUSTOM_KINDS, f"{label(where, doc)}: a kind nothing here checks"
    assert custom_errors(doc) == [], label(where, doc)


def test_a_typo_is_caught_in_each_kind_of_place():
    """The checks above fail on a misspelt field, wherever it is."""
    deployment = json.loads(json.dumps(one("Deployment", "kernelbox")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        validate_builtin(deployment)

    def broken(kind: str, name: str, edit) -> list[str]:
        doc = json.loads(json.dumps(one(kind, name)))
        edit(doc)
        return custom_errors(doc)

    def pod_spec_typo(doc):
        doc["spec"]["podTemplate"]["spec"]["runtimeClass"] = "gvisor"

    assert any(
        "runtimeClass" in e for e in broken("SandboxTemplate", "kernelbox-kernel", pod_spec_typo)
    )
    assert broken(
        "SandboxTemplate", "kernelbox-kernel", lambda d: d["spec"].update(podTemplates={})
    )
    assert broken(
        "SandboxTemplate",
        "kernelbox-kernel",
        lambda d: d["spec"]["networkPolicy"]["ingress"][0].update(form=[]),
    )
    assert broken("SandboxWarmPool", "kernelbox-kernels", lambda d: d["spec"].update(replica=2))
    assert broken("SandboxWarmPool", "kernelbox-kernels", lambda d: d.update(apiVersion="v1"))
    assert broken("RayCluster", "kernelbox-ray", lambda d: d["spec"].update(workerGroupSpec=[]))

    def worker_container_typo(doc):
        group = doc["spec"]["workerGroupSpecs"][0]
        group["template"]["spec"]["containers"][0]["envForm"] = []

    assert any("envForm" in e for e in broken("RayCluster", "kernelbox-ray", worker_container_typo))

    def unquoted_number(doc):
        doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0

    assert broken("RayCluster", "kernelbox-ray", unquoted_number)
    assert broken("RayCluster", "kernelbox-ray", lambda d: d["metadata"].update(nmae="x"))


def test_namespaced_objects_are_in_the_namespace():
    for where, doc in OBJECTS:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, label(where, doc)
        else:
            assert namespace == NAMESPACE, label(where, doc)


def test_the_kustomization_lists_existing_manifests_and_is_the_only_one():
    kustomizations = [(w, d) for w, d in DOCS if d.get("kind") == "Kustomization"]
    assert [w for w, _ in kustomizations] == ["kustomization.yaml"]  # `apply -f DIR` works
    (_, kustomization) = kustomizations[0]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}
    for resource in kustomization["resources"]:
        path = DEPLOY / resource
        assert path.is_file() and path in manifest_files(), resource
    assert not any(r.startswith("examples/") for r in kustomization["resources"])  # no known key
    # No directory a step applies (`kubectl apply -f DIR`) holds a Secret with a known value.
    for where, doc in OBJECTS:
        if doc["kind"] == "Secret":
            assert where.startswith("examples/"), where


# -- what ties them to this repository --------------------------------------------------------


def pod_templates() -> list[tuple[str, dict]]:
    """(name, PodTemplateSpec) of every pod the manifests make."""
    found = []
    for doc in of_kind("Deployment"):
        found.append((doc["metadata"]["name"], doc["spec"]["template"]))
    for doc in of_kind("SandboxTemplate") + of_kind("RayCluster"):
        for where, template in embedded_pod_templates(doc):
            found.append((f"{doc['metadata']['name']}:{where}", template))
    return found


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"


def script_default(name: str) -> str:
    """The default of NAME="${NAME:-default}" in scripts/build-images.sh."""
    script = BUILD_SCRIPT.read_text()
    (value,) = re.findall(rf'^{name}="\$\{{{name}:-([^}}]+)\}}"$', script, re.M)
    return value


def built_images() -> dict[str, str]:
    """{role: image} of scripts/build-images.sh's defaults (KERNEL_IMAGE, SERVICE_IMAGE for the
    Docker backend; LOCAL_IMAGE, the service running kernels itself: local backend, Ray)."""
    return {role: script_default(f"{role}_IMAGE") for role in ("KERNEL", "SERVICE", "LOCAL")}


def local_variant_build_args() -> dict[str, str]:
    """The --build-arg NAME=VALUE the script passes for `local` (Dockerfile's variant)."""
    script = BUILD_SCRIPT.read_text()
    (block,) = re.findall(r'^if \[ "\$WHAT" = local \]; then\n(.*?)^fi$', script, re.M | re.S)
    assert 'build Dockerfile "$LOCAL_IMAGE"' in block
    return dict(a.split("=", 1) for a in re.findall(r'--build-arg "([^"]*)"', block))


def test_every_image_is_one_the_build_script_builds():
    """Kernel pods run the kernel image; every other pod runs kernels itself (the service on the
    local backend, Ray's kernel hosts) or is their Ray Client (same Ray and Python): the local
    variant. The Docker backend's lean service image could run none of them."""
    images = built_images()
    assert len(set(images.values())) == 3
    for name, template in pod_templates():
        kernel_pod = name.startswith("kernelbox-kernel:")
        for container in containers(template):
            expected = images["KERNEL"] if kernel_pod else images["LOCAL"]
            assert container["image"] == expected, (name, container["name"])


def test_the_local_image_has_what_its_pods_need():
    """What `build-images.sh local` passes the Dockerfile: the kernels' data stack kept,
    bubblewrap, the `ray` extra pinned to the RayCluster's rayVersion, the local backend; each
    a build argument the Dockerfile declares (an unknown one is only a warning to docker)."""
    args = local_variant_build_args()
    assert args["KERNEL_ONLY"] == ""
    assert "bubblewrap" in args["EXTRA_APT_PACKAGES"].split()
    assert args["SERVICE_BACKEND"] == "local"
    dockerfile = (ROOT / "Dockerfile").read_text()
    declared = set(re.findall(r"^ARG (\w+)", dockerfile, re.M))
    assert set(args) <= declared, set(args) - declared
    assert "KERNELBOX_BACKEND=${SERVICE_BACKEND}" in dockerfile

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert "ray" in args["EXTRAS"].split() and set(args["EXTRAS"].split()) <= set(extras)
    ray_version = one("RayCluster", "kernelbox-ray")["spec"]["rayVersion"]
    assert script_default("RAY_VERSION") == ray_version
    assert "ray==$RAY_VERSION" in args["EXTRA_PINS"].split()
    # The pin is one the extra allows.
    (ray_requirement,) = [Requirement(r) for r in extras["ray"] if Requirement(r).name == "ray"]
    assert ray_requirement.specifier.contains(ray_version), (ray_requirement, ray_version)


def settings_env_names() -> set[str]:
    from kernelbox_server.service.settings import Settings

    return {f"KERNELBOX_{field.upper()}" for field in Settings.model_fields}


def test_every_kernelbox_variable_is_a_setting():
    settings = settings_env_names()
    from kernelbox_server.sandbox.kernel_boot import BOOT_VARS

    for doc in of_kind("ConfigMap"):
        for name in doc["data"]:
            assert name in settings, f"ConfigMap {doc['metadata']['name']}: {name}"
    for pod, template in pod_templates():
        # Kernel pods run kernel_boot.py, not the service: its variables, not the settings.
        allowed = set(BOOT_VARS) if pod.startswith("kernelbox-kernel:") else settings | RAY_MODE_ENV
        for container in containers(template):
            for env in container.get("env", []):
                if env["name"].startswith("KERNELBOX_"):
                    assert env["name"] in allowed, f"{pod}: {env['name']}"


def test_references_between_objects_resolve():
    configmaps = {d["metadata"]["name"]: d for d in of_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in of_kind("Secret")}
    accounts = {d["metadata"]["name"] for d in of_kind("ServiceAccount")}
    runtime_classes = {d["metadata"]["name"]: d for d in of_kind("RuntimeClass")}
    for pod, template in pod_templates():
        spec = template["spec"]
        assert spec.get("serviceAccountName", "kernelbox") in accounts, pod
        assert spec.get("automountServiceAccountToken") is False, pod
        if "runtimeClassName" in spec:
            assert runtime_classes[spec["runtimeClassName"]]["handler"] == "runsc", pod
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, pod
        for container in containers(template):
            mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
            assert set(mounts) <= set(volumes), pod
            env = {}
            for source in container.get("envFrom", []):
                env |= configmaps[source["configMapRef"]["name"]]["data"]
            env |= {e["name"]: e.get("value") for e in container.get("env", [])}
            # The API key file is the mounted Secret's key.
            if key_file := env.get("KERNELBOX_API_KEY_FILE"):
                directory, key = key_file.rsplit("/", 1)
                (mount,) = [m for m in mounts.values() if m["mountPath"] == directory]
                secret = secrets[volumes[mount["name"]]["secret"]["secretName"]]
                assert key in secret.get("stringData", secret.get("data", {})), pod
            # A read-only root: every path the service or Ray writes is a volume.
            if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                paths = {m["mountPath"] for m in mounts.values()}
                if env.get("KERNELBOX_DATA_DIR"):
                    assert env["KERNELBOX_DATA_DIR"] in paths, pod
                assert "/tmp" in paths, pod


def matches(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_selectors_select_pods():
    pods = {name: template["metadata"].get("labels", {}) for name, template in pod_templates()}
    for doc in of_kind("Deployment"):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert matches(doc["spec"]["selector"], labels), doc["metadata"]["name"]
    for doc in of_kind("Service"):
        selected = [
            n
            for n, labels in pods.items()
            if matches({"matchLabels": doc["spec"]["selector"]}, labels)
        ]
        assert selected, f"Service {doc['metadata']['name']} selects no pod"
    for doc in of_kind("PodDisruptionBudget") + of_kind("NetworkPolicy"):
        selector = doc["spec"][
            "selector" if doc["kind"] == "PodDisruptionBudget" else "podSelector"
        ]
        assert any(matches(selector, labels) for labels in pods.values()), doc["metadata"]["name"]
    # Kernels take connections from the service's pods, and only from them.
    kernel_rules = one("SandboxTemplate", "kernelbox-kernel")["spec"]["networkPolicy"]["ingress"]
    policy = one("NetworkPolicy", "kernelbox-kernels")["spec"]
    for rules in (kernel_rules, policy["ingress"]):
        for rule in rules:
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}
                assert matches(peer["podSelector"], pods["kernelbox"])
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    assert "egress" not in one("SandboxTemplate", "kernelbox-kernel")["spec"]["networkPolicy"]


def test_probes_name_routes_and_ports_that_exist():
    health = (ROOT / "service" / "routes" / "health.py").read_text()
    routes = set(re.findall(r'@router\.get\("([^"]+)"', health))
    assert {"/healthz", "/readyz"} <= routes
    for pod, template in pod_templates():
        for container in containers(template):
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = container.get(probe, {})
                target = action.get("httpGet") or action.get("tcpSocket")
                if target:
                    assert target["port"] in ports, (pod, probe)
                if "httpGet" in action:
                    assert action["httpGet"]["path"] in routes, (pod, probe)
                    expected = "/readyz" if probe == "readinessProbe" else "/healthz"
                    assert action["httpGet"]["path"] == expected, (pod, probe)
        if pod in ("kernelbox", "kernelbox-front"):
            assert "readinessProbe" in template["spec"]["containers"][0], pod


def kernel_container() -> dict:
    template = one("SandboxTemplate", "kernelbox-kernel")["spec"]["podTemplate"]
    (container,) = template["spec"]["containers"]
    return container


def test_kernel_pods_are_locked_down():
    template = one("SandboxTemplate", "kernelbox-kernel")["spec"]["podTemplate"]
    spec, container = template["spec"], kernel_container()
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    rlimits = json.loads({e["name"]: e["value"] for e in container["env"]}["KERNELBOX_RLIMITS"])
    assert rlimits["NPROC"] > 0
    # The ports it listens on are the ones declared and the ones the policies open.
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"] if "=" in a)
    channels = ("shell", "iopub", "stdin", "control", "hb")
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {c: int(args[c]) for c in channels} == declared
    (rule,) = one("NetworkPolicy", "kernelbox-kernels")["spec"]["ingress"]
    (port,) = rule["ports"]
    assert (port["port"], port["endPort"]) == (min(declared.values()), max(declared.values()))
    assert sorted(declared.values()) == list(range(port["port"], port["endPort"] + 1))


def test_bubblewrap_pods_are_not_under_gvisor():
    """bwrap fails under gVisor: the local backend's pods must use another runtime."""
    ray = one("RayCluster", "kernelbox-ray")["spec"]
    for template in (
        one("Deployment", "kernelbox")["spec"]["template"],
        *(group["template"] for group in ray["workerGroupSpecs"]),
    ):
        assert "runtimeClassName" not in template["spec"]
        assert template["spec"]["hostUsers"] is False  # a user namespace of the pod's own


def test_ray_mode_wiring():
    cluster = one("RayCluster", "kernelbox-ray")
    head = cluster["spec"]["headGroupSpec"]
    assert "kernelbox_host" not in head["rayStartParams"].get("resources", "")
    for group in cluster["spec"]["workerGroupSpecs"]:
        resources = json.loads(group["rayStartParams"]["resources"].strip("'"))
        assert resources == {"kernelbox_host": 1}
    front = one("Deployment", "kernelbox-front")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in front["env"]}
    assert env["KERNELBOX_CLUSTER"] == "ray"
    # KubeRay's head service: <cluster>-head-svc, Ray Client on 10001.
    head_service = f"{cluster['metadata']['name']}-head-svc"
    assert env["KERNELBOX_RAY_ADDRESS"] == f"ray://{head_service}:{RAY_CLIENT_PORT}"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert RAY_CLIENT_PORT in head_ports


def test_the_kernel_image_ships_the_probe():
    command = kernel_container()["readinessProbe"]["exec"]["command"]
    script = next(part for part in command if part.endswith(".py"))
    assert (
        f"COPY sandbox/{Path(script).name} {script}\n" in (ROOT / "Dockerfile.kernel").read_text()
    )
    assert f"!sandbox/{Path(script).name}\n" in (ROOT / ".dockerignore").read_text()


# -- the kernel pod's arguments and readiness probe, against a real kernel --------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_probe(command: list[str], connection_file: Path) -> subprocess.CompletedProcess:
    # The image's interpreter and paths, mapped to this checkout's.
    mapped = [sys.executable, str(ROOT / "sandbox" / "kernel_probe.py")]
    mapped += [str(connection_file) if p.endswith("connection.json") else p for p in command[2:]]
    return subprocess.run(mapped, capture_output=True, text=True, timeout=60)


def test_the_kernel_pod_arguments_start_a_kernel_the_probe_finds_ready(tmp_path):
    """kernel_boot.py with the SandboxTemplate's arguments (connection file under tmp_path,
    loopback and free ports instead of 0.0.0.0 and 5555-5559: the names are the manifest's),
    then its readiness probe command: not ready before the kernel is up, ready once it
    answers 1+1, not ready after it has gone."""
    container = kernel_container()
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["/opt/venv/bin/python", "/opt/kernelbox/kernel_probe.py"]
    connection_file = tmp_path / "connection.json"
    ports = iter(free_ports(5))
    args = []
    for arg in container["args"]:
        if arg.endswith("connection.json"):
            arg = str(connection_file)
        elif arg.startswith("--ip="):
            arg = "--ip=127.0.0.1"
        elif re.fullmatch(r"--(shell|iopub|stdin|control|hb)=\d+", arg):
            arg = f"{arg.split('=')[0]}={next(ports)}"
        args.append(arg)
    env = {e["name"]: e["value"] for e in container["env"]}
    # RLIMIT_NPROC counts every process of the user running this test, not of a pod's uid.
    rlimits = json.loads(env["KERNELBOX_RLIMITS"])
    rlimits.pop("NPROC")
    env["KERNELBOX_RLIMITS"] = json.dumps(rlimits)

    early = run_probe(command, connection_file)
    assert early.returncode == 1 and "no usable connection file" in early.stderr

    kernel = subprocess.Popen(
        [sys.executable, str(ROOT / "sandbox" / "kernel_boot.py"), *args],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MPLBACKEND": "Agg", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            result = run_probe(command, connection_file)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            assert kernel.poll() is None, kernel.stderr.read()
            time.sleep(0.5)
        assert result.returncode == 0, result.stderr
        info = json.loads(connection_file.read_text())
        assert info["transport"] == "tcp" and info["key"]  # written by the kernel itself
    finally:
        kernel.kill()
        kernel.wait(timeout=30)
    gone = run_probe(command, connection_file)
    assert gone.returncode == 1 and "not ready" in gone.stderr
