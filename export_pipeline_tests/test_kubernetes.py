"""deploy/kubernetes, read as Kubernetes and dagster-k8s would read it.

No cluster runs here, so the manifests are checked by reading them: every field is one the
Kubernetes API has (the `kubernetes` client's models), every container runs as the image's
unprivileged user on a read-only root with writable emptyDirs only, no ConfigMap holds a secret,
every setting the code reads reaches the processes that read it, and the NetworkPolicies, evaluated
by `ingress_allowed` below, let through what the pipeline needs and nothing else. The run
launcher's config is checked against dagster-k8s's own schema and then launches a run against a
recording stand-in for the Kubernetes API: the Job it sends is checked like the Deployments, and
the API calls it makes are what the Roles grant, no more.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from dagster import DagsterInstance, instance_for_test
from dagster._config import process_config
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import LaunchRunContext
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.test_utils import create_run_for_test
from dagster_k8s import K8sRunLauncher

from export_pipeline.defs.runs import launches_here, run_slots
from export_pipeline.settings import (
    READ_ELSEWHERE,
    S3_CLIENTS,
    SECRETS,
    Settings,
    parse_ui_hosts,
    variables_read,
)
from export_pipeline.ui import refusal
from export_pipeline_tests.conftest import DOCS, REPO

BASE = REPO / "deploy" / "kubernetes"
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
NAMESPACE: str = KUSTOMIZATION["namespace"]
INSTANCE_YAML: dict[str, Any] = yaml.safe_load((BASE / "dagster.yaml").read_text())
LAUNCHER_CONFIG: dict[str, Any] = INSTANCE_YAML["run_launcher"]["config"]
PROJECT_VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UID = 10001  # the Dockerfile's `exporter`
# The securityContext every container has (the namespace's Pod Security "restricted" and more).
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
CLUSTER_SCOPED = {"Namespace"}
# Dagster's storage: what every Dagster process reads (dagster.yaml's {env: ...}).
STORAGE_VARIABLES = set(re.findall(r"\{env: ([A-Z_]+)\}", (BASE / "dagster.yaml").read_text()))
# The secrets the pipeline's processes read (the rest of SECRETS belong to compose's servers).
PIPELINE_SECRETS = {
    name
    for name in SECRETS
    if name in variables_read()
    or (name in READ_ELSEWHERE and READ_ELSEWHERE[name].reader == S3_CLIENTS)
}
SECRET_NAME: str = LAUNCHER_CONFIG["env_secrets"][0]
SETTINGS_NAME: str = LAUNCHER_CONFIG["env_config_maps"][0]


def manifests() -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/kubernetes` builds: the resources, the generated
    ConfigMap, each namespaced object in the kustomization's namespace."""
    objects: list[dict[str, Any]] = []
    for name in KUSTOMIZATION["resources"]:
        objects += [doc for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]
    for generator in KUSTOMIZATION["configMapGenerator"]:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": {name: (BASE / name).read_text() for name in generator["files"]},
            }
        )
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"].setdefault("namespace", NAMESPACE)
    return objects


OBJECTS = manifests()


def the(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] == kind]


DEPLOYMENTS = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
SETTINGS: dict[str, str] = the("ConfigMap", SETTINGS_NAME)["data"]


def pod_spec(deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = DEPLOYMENTS[deployment]["spec"]["template"]["spec"]
    return spec


def container(deployment: str) -> dict[str, Any]:
    [only] = pod_spec(deployment)["containers"]
    return dict(only)


# --- The NetworkPolicy evaluator ------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its namespace (with that namespace's labels, to which
    Kubernetes adds kubernetes.io/metadata.name) and its labels."""

    namespace: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str] = field(default_factory=dict)

    def all_namespace_labels(self) -> dict[str, str]:
        return {**self.namespace_labels, "kubernetes.io/metadata.name": self.namespace}


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) applied to `labels`; {} selects all."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {operator}")
    return True


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers are addresses, not pods: not evaluated here")
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
    if namespaces is None:  # a podSelector alone: pods of the policy's own namespace
        in_namespace = source.namespace == policy_namespace
    else:
        in_namespace = selects(namespaces, source.all_namespace_labels())
    return in_namespace and (pods is None or selects(pods, source.labels))


def _port_matches(rule_port: Mapping[str, Any], port: int, protocol: str) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True
    number = rule_port["port"]
    if not isinstance(number, int):
        raise NotImplementedError(f"named port {number!r}: the policies use numbers")
    return number <= port <= rule_port.get("endPort", number)


def ingress_allowed(
    policies: Iterable[Mapping[str, Any]],
    target: Pod,
    source: Pod,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether NetworkPolicies let `source` connect to `target` on `port`: a pod no policy
    selects for ingress accepts everything; a selected pod, only what a rule of one of the
    policies selecting it allows (rules add up; an empty `from` or `ports` means any)."""
    isolating = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes") or ["Ingress"]
        if policy["metadata"]["namespace"] != target.namespace or "Ingress" not in types:
            continue
        if selects(spec["podSelector"], target.labels):
            isolating.append(policy)
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            from_ok = not peers or any(
                _peer_matches(peer, policy["metadata"]["namespace"], source) for peer in peers
            )
            port_ok = not ports or any(_port_matches(p, port, protocol) for p in ports)
            if from_ok and port_ok:
                return True
    return False


def policy(name: str, spec: dict[str, Any], namespace: str = "app") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


NAME_LABEL = "kubernetes.io/metadata.name"
WEB = Pod("app", {"role": "web"})
DEFAULT_DENY = policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})


def test_the_evaluator_allows_everything_to_a_pod_no_policy_selects() -> None:
    other = policy("other", {"podSelector": {"matchLabels": {"role": "db"}}, "ingress": []})
    assert ingress_allowed([other], WEB, Pod("elsewhere", {}), 80)
    assert not ingress_allowed([DEFAULT_DENY, other], WEB, Pod("elsewhere", {}), 80)


def test_the_evaluator_reads_peers_ports_and_selectors_as_kubernetes_does() -> None:
    and_peer = policy(
        "and",
        {
            "podSelector": {"matchLabels": {"role": "web"}},
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"team": "ops"}},
                            "podSelector": {"matchLabels": {"role": "proxy"}},
                        }
                    ],
                    "ports": [{"port": 8000, "endPort": 8010}],
                }
            ],
        },
    )
    proxy = Pod("edge", {"role": "proxy"}, {"team": "ops"})
    assert ingress_allowed([and_peer], WEB, proxy, 8005)
    assert not ingress_allowed([and_peer], WEB, proxy, 8011)
    assert not ingress_allowed([and_peer], WEB, proxy, 8005, protocol="UDP")
    # Both selectors in one peer: the pod must match and be in a matching namespace.
    assert not ingress_allowed(
        [and_peer], WEB, Pod("edge", {"role": "other"}, {"team": "ops"}), 8005
    )
    assert not ingress_allowed([and_peer], WEB, Pod("edge", {"role": "proxy"}), 8005)
    # A podSelector alone is the policy's own namespace only.
    same_namespace = policy(
        "same",
        {
            "podSelector": {},
            "ingress": [
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchExpressions": [
                                    {"key": "role", "operator": "In", "values": ["a", "b"]},
                                    {"key": "debug", "operator": "DoesNotExist"},
                                ]
                            }
                        }
                    ]
                }
            ],
        },
    )
    assert ingress_allowed([same_namespace], WEB, Pod("app", {"role": "b"}), 1)
    assert not ingress_allowed([same_namespace], WEB, Pod("other", {"role": "b"}), 1)
    assert not ingress_allowed([same_namespace], WEB, Pod("app", {"role": "c"}), 1)
    assert not ingress_allowed([same_namespace], WEB, Pod("app", {"role": "a", "debug": "1"}), 1)
    # Namespaces are known by their automatic name label; an empty rule allows all.
    by_name = policy(
        "name",
        {
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: "edge"}}}]}],
        },
    )
    assert ingress_allowed([by_name], WEB, Pod("edge", {}), 1)
    assert not ingress_allowed([by_name], WEB, Pod("edges", {}), 1)
    assert ingress_allowed([policy("open", {"podSelector": {}, "ingress": [{}]})], WEB, proxy, 1)
    # An egress-only policy isolates nothing for ingress.
    egress = policy("egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    assert ingress_allowed([egress], WEB, proxy, 1)


# --- The run's pod, as K8sRunLauncher makes it ----------------------------------------------------

# Each Kubernetes API call dagster-k8s's client makes, as the permission RBAC checks for it:
# (API group, resource, verb). A call not listed here fails the test that records it.
API_PERMISSIONS = {
    "create_namespaced_job": ("batch", "jobs", "create"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "read_namespaced_job_status": ("batch", "jobs/status", "get"),
    "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_pod": ("", "pods", "get"),
    "delete_namespaced_pod": ("", "pods", "delete"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "list_namespaced_event": ("", "events", "list"),
}


class RecordingApi:
    """Stands in for BatchV1Api and CoreV1Api: records each call's permission and the Jobs
    created, and answers as a cluster with one pod per Job would."""

    def __init__(self) -> None:
        self.permissions: list[tuple[str, str, str]] = []
        self.jobs: list[tuple[str, Any]] = []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        if method not in API_PERMISSIONS:
            raise AssertionError(f"K8sRunLauncher calls {method}, which API_PERMISSIONS lacks")

        def call(*args: Any, **kwargs: Any) -> Any:
            self.permissions.append(API_PERMISSIONS[method])
            if method == "create_namespaced_job":
                self.jobs.append((kwargs["namespace"], kwargs["body"]))
            if method == "list_namespaced_pod":
                pod = kubernetes.client.V1Pod(metadata=kubernetes.client.V1ObjectMeta(name="p"))
                return kubernetes.client.V1PodList(items=[pod])
            return None

        return call


CODE_SERVER_IMAGE = next(
    e["value"] for e in container("code-server")["env"] if e["name"] == "DAGSTER_CURRENT_IMAGE"
)


@dataclass
class Launch:
    """What launching (and terminating) one run did: the Job's pod template as Kubernetes reads
    it (camelCase), and the permissions each step used."""

    namespace: str
    job: dict[str, Any]
    launch_permissions: set[tuple[str, str, str]]
    terminate_permissions: set[tuple[str, str, str]]

    @property
    def pod(self) -> dict[str, Any]:
        template: dict[str, Any] = self.job["spec"]["template"]
        return template


def launcher(api: RecordingApi, monkeypatch: pytest.MonkeyPatch) -> K8sRunLauncher:
    """The instance's run launcher, from dagster.yaml's config as Dagster processes it, its
    Kubernetes API the recording one (there is no in-cluster configuration to load here)."""
    processed = process_config(K8sRunLauncher.config_type(), LAUNCHER_CONFIG)
    assert processed.success, processed.errors
    monkeypatch.setattr("dagster_k8s.launcher.load_kubernetes_config", lambda **_: None)
    return K8sRunLauncher(
        **{**dict(processed.value or {}), "k8s_client_batch_api": api, "k8s_client_core_api": api}
    )


def launch_run(
    instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch, tags: Mapping[str, str]
) -> Launch:
    """Launch a run of `export_due_slices` with `tags`, as the daemon does when it leaves the
    queue, then terminate it, as the operators' UI does: the Job is what Kubernetes would get."""
    api = RecordingApi()
    run_launcher = launcher(api, monkeypatch)
    run_launcher.register_instance(instance)
    origin = JobPythonOrigin(
        "export_due_slices",
        RepositoryPythonOrigin(
            executable_path="/usr/local/bin/python",
            code_pointer=ModuleCodePointer(
                "export_pipeline.definitions", "defs", "/opt/export-pipeline"
            ),
            container_image=CODE_SERVER_IMAGE,  # what the code server reports
        ),
    )
    run = create_run_for_test(
        instance, job_name="export_due_slices", job_code_origin=origin, tags=dict(tags)
    )
    run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    launched = set(api.permissions)
    api.permissions.clear()
    assert run_launcher.terminate(run.run_id)
    [(namespace, job)] = api.jobs
    serialized = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    return Launch(namespace, serialized, launched, set(api.permissions))


@pytest.fixture(scope="module")
def k8s_instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def launched(k8s_instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> Launch:
    return launch_run(k8s_instance, monkeypatch, {})


# --- The folder and the objects -------------------------------------------------------------------


def test_the_kustomization_lists_every_file_in_its_folder() -> None:
    listed = {
        *KUSTOMIZATION["resources"],
        *KUSTOMIZATION.get("configurations", []),
        *(name for g in KUSTOMIZATION["configMapGenerator"] for name in g["files"]),
    }
    files = {path.name for path in BASE.iterdir()} - {"kustomization.yaml"}
    assert files == listed
    assert {o["kind"] for o in OBJECTS} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "NetworkPolicy",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    assert of_kind("Secret") == []  # the secrets are created by hand, never shipped


def unknown_fields(value: Any, type_name: str, path: str) -> list[str]:
    """Where `value` does not fit the Kubernetes API type `type_name` (as the `kubernetes`
    client's models name it): unknown fields, which kubectl refuses or, with its validation
    off, the API server drops (a misspelt securityContext field would vanish so), and values of
    the wrong kind."""
    container_type = re.fullmatch(r"(list|dict)[\[(](?:str, )?(.+)[\])]", type_name)
    if container_type:
        items = value.items() if container_type[1] == "dict" else enumerate(value)
        if not isinstance(value, dict if container_type[1] == "dict" else list):
            return [f"{path}: not a {container_type[1]}"]
        return [
            problem
            for key, item in items
            for problem in unknown_fields(item, container_type[2], f"{path}[{key}]")
        ]
    primitives: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,)}
    if type_name in primitives:
        ok = isinstance(value, primitives[type_name]) and not (
            type_name == "int" and isinstance(value, bool)
        )
        return [] if ok else [f"{path}: {value!r} is not a {type_name}"]
    if type_name == "object":  # int-or-string and free-form fields
        return []
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: not an object"]
    fields = {json: attr for attr, json in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{path}.{key}: no such field in {type_name}")
        else:
            problems += unknown_fields(item, model.openapi_types[fields[key]], f"{path}.{key}")
    return problems


def test_unknown_fields_finds_typos_and_wrong_kinds_of_value() -> None:
    assert unknown_fields({"runAsNonRoot": True}, "V1SecurityContext", "s") == []
    assert unknown_fields({"readOnlyRootFileSystem": True}, "V1SecurityContext", "s") == [
        "s.readOnlyRootFileSystem: no such field in V1SecurityContext"
    ]
    assert unknown_fields({"data": {"PORT": 8080}}, "V1ConfigMap", "c") == [
        "c.data[PORT]: 8080 is not a str"
    ]


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_has_only_fields_the_kubernetes_api_has(obj: dict[str, Any]) -> None:
    kind_version = obj["apiVersion"].rsplit("/", 1)[-1].capitalize() + obj["kind"]
    assert unknown_fields(obj, kind_version, obj["kind"]) == []


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = the("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert LAUNCHER_CONFIG["job_namespace"] == NAMESPACE


# --- Containers -----------------------------------------------------------------------------------


def pod_templates(launched: Launch) -> dict[str, dict[str, Any]]:
    """Every pod the pipeline runs: the Deployments' and a run's."""
    return {
        **{name: d["spec"]["template"] for name, d in DEPLOYMENTS.items()},
        "run": launched.pod,
    }


def test_the_five_deployments_exist_and_one_daemon_at_most_runs() -> None:
    assert set(DEPLOYMENTS) == {
        "code-server",
        "dagster-webserver",
        "dagster-webserver-operator",
        "dagster-daemon",
        "health",
    }
    assert all(d["spec"]["replicas"] == 1 for d in DEPLOYMENTS.values())
    # A rolling update would run two daemons for a while: the old one must stop first.
    assert DEPLOYMENTS["dagster-daemon"]["spec"]["strategy"] == {"type": "Recreate"}


def test_every_container_runs_unprivileged_on_a_read_only_root(launched: Launch) -> None:
    for name, template in pod_templates(launched).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for each in spec["containers"] + spec.get("initContainers", []):
            context = each["securityContext"]
            assert {key: context.get(key) for key in RESTRICTED} == RESTRICTED, name
            assert not context.get("privileged"), name


def test_only_emptydirs_are_writable_and_dagster_home_and_tmp_are(launched: Launch) -> None:
    for name, template in pod_templates(launched).items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        [each] = spec["containers"]
        writable = {}
        for mount in each["volumeMounts"]:
            volume = volumes[mount["name"]]
            if not mount.get("readOnly"):
                assert "emptyDir" in volume, f"{name}: {mount['mountPath']} is writable"
                writable[mount["mountPath"]] = volume
            else:
                assert set(volume) - {"name"} <= {"configMap", "emptyDir"}, name
        # Where Dagster and the pipeline write: DAGSTER_HOME (storage/, logs/, .logs_queue/) and
        # Python's temporary files (the day files staged for upload among them).
        assert set(writable) == {"/opt/dagster/home", "/tmp"}, name
        assert all(v["emptyDir"].get("sizeLimit") for v in writable.values()), name
        instance_mount = next(
            m for m in each["volumeMounts"] if m["mountPath"] == "/opt/dagster/home/dagster.yaml"
        )
        assert volumes[instance_mount["name"]]["configMap"]["name"] == "dagster-instance"
        assert instance_mount["readOnly"] and instance_mount["subPath"] == "dagster.yaml"


def test_no_token_is_mounted_but_where_the_kubernetes_api_is_used(launched: Launch) -> None:
    api_users = {"dagster-daemon", "dagster-webserver", "dagster-webserver-operator"}
    for name, template in pod_templates(launched).items():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is (name in api_users), name
        # No <SERVICE>_PORT variables: dagster-webserver reads DAGSTER_WEBSERVER_PORT as --port.
        assert spec["enableServiceLinks"] is False, name
    assert the("ServiceAccount", "export-pipeline")["automountServiceAccountToken"] is False


def test_every_container_has_the_documented_resources(launched: Launch) -> None:
    for name, template in pod_templates(launched).items():
        [each] = template["spec"]["containers"]
        assert each["resources"] == {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        }, name


def test_the_health_service_is_what_the_probes_and_the_monitors_ask() -> None:
    health = container("health")
    assert health["command"] == ["python", "-m", "export_pipeline.health"]
    assert health["ports"] == [{"name": "http", "containerPort": int(SETTINGS["PORT"])}]
    assert health["livenessProbe"] == {
        "httpGet": {"path": "/health", "port": 8080},
        "periodSeconds": 10,
    }
    assert health["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": 8080},
        "periodSeconds": 15,
        "timeoutSeconds": 3,
    }
    # A monitor reads /ready's failing checks through the Service even while it fails.
    assert the("Service", "health")["spec"]["publishNotReadyAddresses"] is True


# --- Images ---------------------------------------------------------------------------------------


def test_every_image_is_the_projects_pinned_to_its_version(launched: Launch) -> None:
    image = f"export-pipeline:{PROJECT_VERSION}"
    for name, template in pod_templates(launched).items():
        for each in template["spec"]["containers"]:
            assert each["image"] == image, name
            assert each["imagePullPolicy"] == "IfNotPresent", name
    # The run's pod runs the code server's image, which kustomize's images: sets in both places.
    assert CODE_SERVER_IMAGE == container("code-server")["image"] == image
    assert KUSTOMIZATION["images"] == [{"name": "export-pipeline", "newTag": PROJECT_VERSION}]
    config = yaml.safe_load((BASE / "kustomizeconfig.yaml").read_text())
    assert {"path": "spec/template/spec/containers/env/value", "kind": "Deployment"} in config[
        "images"
    ]


def test_the_image_installs_dagster_k8s_and_runs_as_the_manifests_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = [shlex.split(line) for line in dockerfile.splitlines() if line.startswith("RUN pip ")]
    assert any(".[k8s]" in words for words in runs)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["k8s"] == [f"dagster-k8s=={version('dagster-k8s')}"]
    assert f"--uid {UID} --gid {UID}" in dockerfile and f"--gid {UID} exporter" in dockerfile
    assert "ENV DAGSTER_HOME=/opt/dagster/home" in dockerfile
    assert LAUNCHER_CONFIG["dagster_home"] == "/opt/dagster/home"


# --- Settings and secrets -------------------------------------------------------------------------


def test_no_configmap_holds_a_secret() -> None:
    for config_map in of_kind("ConfigMap"):
        names = set(config_map["data"])
        assert names & SECRETS == set(), config_map["metadata"]["name"]
        assert [n for n in names if re.search(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", n)] == []
    # The instance's password is the environment's, never a value in dagster.yaml.
    db = INSTANCE_YAML["storage"]["postgres"]["postgres_db"]
    assert db["password"] == {"env": "CHECKPOINT_DB_PASSWORD"}
    assert all(
        isinstance(value, dict) and set(value) == {"env"}
        for k, value in db.items()
        if k != "scheme"
    )


def test_every_setting_the_code_reads_is_in_the_configmap_or_the_secret() -> None:
    read = set(variables_read()) | STORAGE_VARIABLES
    assert read - set(SETTINGS) - PIPELINE_SECRETS == set()
    assert set(SETTINGS) <= read  # and nothing else
    assert {"S3_BUCKET", "INFLUXDB_URL", "CHECKPOINT_DB_HOST", "UI_ALLOWED_HOSTS"} <= set(SETTINGS)
    # The values are valid settings (S3_BUCKET set, crons and numbers parse).
    settings = Settings.from_env(SETTINGS)
    assert settings.checkpoint.user == "export_pipeline"  # the least-privilege role, not postgres


def test_the_secrets_names_are_documented_where_the_secret_is_created() -> None:
    text = (DOCS / "operations.md").read_text()
    kubernetes_paragraph = text[text.index("**Kubernetes.**") : text.index("**Scaling out.**")]
    assert SECRET_NAME in kubernetes_paragraph and "--from-env-file" in kubernetes_paragraph
    assert [name for name in sorted(PIPELINE_SECRETS) if name not in kubernetes_paragraph] == []


def environment_names(each: Mapping[str, Any]) -> tuple[set[str], set[str], set[str]]:
    """A container's variables: set by envFrom (ConfigMap, Secret), and by name from each."""
    env_from = each.get("envFrom", [])
    config_maps = {e["configMapRef"]["name"] for e in env_from if "configMapRef" in e}
    secrets = {e["secretRef"]["name"] for e in env_from if "secretRef" in e}
    return config_maps, secrets, {e["name"] for e in each.get("env", [])}


def test_each_process_gets_the_settings_and_secrets_it_reads_and_no_more(launched: Launch) -> None:
    everything = ({SETTINGS_NAME}, {SECRET_NAME})
    # The code server (sensor, schedules), the health service and the runs read InfluxDB and S3.
    for name in ("code-server", "health"):
        assert environment_names(container(name))[:2] == everything, name
    [run] = launched.pod["spec"]["containers"]
    assert environment_names(run)[:2] == everything
    # The webservers and the daemon read Dagster's storage (and the UI its hosts): no InfluxDB or
    # S3 credential reaches them.
    wanted = {
        "dagster-webserver": STORAGE_VARIABLES | {"UI_ALLOWED_HOSTS"},
        "dagster-webserver-operator": STORAGE_VARIABLES | {"UI_ALLOWED_HOSTS"},
        "dagster-daemon": STORAGE_VARIABLES,
    }
    for name, variables in wanted.items():
        each = container(name)
        assert environment_names(each) == (set(), set(), variables), name
        for entry in each["env"]:
            source = entry["valueFrom"]
            if entry["name"] in SECRETS:
                assert source == {"secretKeyRef": {"name": SECRET_NAME, "key": entry["name"]}}, name
            else:
                assert source == {
                    "configMapKeyRef": {"name": SETTINGS_NAME, "key": entry["name"]}
                }, name
                assert entry["name"] in SETTINGS


# --- The webservers and the code server -----------------------------------------------------------


def service_for(deployment: str) -> dict[str, Any]:
    labels = DEPLOYMENTS[deployment]["spec"]["template"]["metadata"]["labels"]
    [service] = [
        s for s in of_kind("Service") if selects({"matchLabels": s["spec"]["selector"]}, labels)
    ]
    return service


def test_each_service_reaches_one_deployment_on_a_port_it_serves() -> None:
    for service in of_kind("Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        [deployment] = [
            name
            for name, d in DEPLOYMENTS.items()
            if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert service["spec"]["type"] == "ClusterIP"
        ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"], service["metadata"]["name"]


def ingress_backend() -> tuple[str, int, list[str]]:
    ingress = the("Ingress", "dagster-ui")
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    return backend["name"], backend["port"]["number"], [rule["host"]]


def test_the_ingress_is_the_one_docs_security_shows() -> None:
    text = (DOCS / "security.md").read_text()
    section = text[text.index("## Kubernetes") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    block = section[start : section.index("\n```", start)]
    documented = yaml.safe_load(block)
    ours = the("Ingress", "dagster-ui")
    assert {k: v for k, v in ours.items() if k != "metadata"} == {
        k: v for k, v in documented.items() if k != "metadata"
    }
    assert ours["metadata"]["annotations"] == documented["metadata"]["annotations"]
    assert documented["metadata"]["namespace"] == NAMESPACE


def test_the_webservers_run_the_guarded_ui_read_only_behind_the_ingress() -> None:
    service, port, hosts = ingress_backend()
    assert service_for("dagster-webserver")["metadata"]["name"] == service
    for name in ("dagster-webserver", "dagster-webserver-operator"):
        command = container(name)["command"]
        assert command[:3] == ["python", "-m", "export_pipeline.ui"], name
        assert command[command.index("-p") + 1] == str(port)
        assert command[command.index("-h") + 1] == "0.0.0.0"
        assert ("--read-only" in command) is (name == "dagster-webserver"), name
    # The UI answers the Ingress's host, and the probes' and port-forward's localhost.
    allowed = parse_ui_hosts(SETTINGS)
    for host in [*hosts, "localhost"]:
        assert host in allowed
        request = {"kind": "http", "method": "GET", "path": "/server_info", "query_string": ""}
        assert refusal(**request, headers={"host": host}, allowed_hosts=allowed) is None
    for name in ("dagster-webserver", "dagster-webserver-operator"):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container(name)[probe]["httpGet"]
            assert get["port"] == port and get["httpHeaders"] == [
                {"name": "Host", "value": "localhost"}
            ]


def test_the_webservers_and_the_daemon_load_the_code_from_the_code_server() -> None:
    workspace = yaml.safe_load((BASE / "workspace.yaml").read_text())
    [entry] = workspace["load_from"]
    grpc = entry["grpc_server"]
    code_server = service_for("code-server")
    assert grpc["host"] == code_server["metadata"]["name"]
    assert grpc["port"] == code_server["spec"]["ports"][0]["port"]
    command = container("code-server")["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    assert command[command.index("-p") + 1] == str(grpc["port"])
    assert importlib.util.find_spec(command[command.index("-m") + 1]) is not None
    for name in ("dagster-webserver", "dagster-webserver-operator", "dagster-daemon"):
        each = container(name)
        path = each["command"][each["command"].index("-w") + 1]
        [mount] = [m for m in each["volumeMounts"] if m["mountPath"] == path]
        assert mount["subPath"] == "workspace.yaml" and mount["readOnly"], name


# --- dagster.yaml ---------------------------------------------------------------------------------


def test_the_instance_config_is_valid_for_dagster_and_each_class_it_names(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text((BASE / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # raises on an invalid instance config
    assert "postgres" in config["storage"]
    for section in ("run_launcher", "run_coordinator", "compute_logs"):
        named = INSTANCE_YAML[section]
        cls = getattr(importlib.import_module(named["module"]), named["class"])
        processed = process_config(cls.config_type(), named.get("config", {}))
        assert processed.success, (section, processed.errors)
    assert INSTANCE_YAML["run_launcher"]["class"] == K8sRunLauncher.__name__


def test_the_sensor_sizes_a_tick_in_the_code_servers_pod_without_an_api_token(
    tmp_path: Path, checkpoint_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sensor runs in the code server's pod, which mounts no API token: sizing a tick reads
    the launcher from the instance's config (Kubernetes: not this host's cores) and never builds
    dagster-k8s's launcher, which would load the in-cluster config and fail."""
    (tmp_path / "dagster.yaml").write_text((BASE / "dagster.yaml").read_text())
    for name, value in checkpoint_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert not launches_here(instance)
        assert (
            run_slots(instance) == INSTANCE_YAML["run_coordinator"]["config"]["max_concurrent_runs"]
        )
        with pytest.raises(Exception, match=r"(?i)service (host|token)|kube"):
            instance.run_launcher  # noqa: B018  (what the sensor must not do here)


def test_an_invalid_launcher_config_is_refused() -> None:
    wrong = {**LAUNCHER_CONFIG, "env_secret": [SECRET_NAME]}
    assert not process_config(K8sRunLauncher.config_type(), wrong).success
    missing = {k: v for k, v in LAUNCHER_CONFIG.items() if k != "instance_config_map"}
    assert not process_config(K8sRunLauncher.config_type(), missing).success


def test_the_instance_is_the_repos_but_for_how_runs_are_launched() -> None:
    repo = yaml.safe_load((REPO / "dagster.yaml").read_text())
    for section in ("storage", "run_coordinator", "retention", "python_logs", "telemetry"):
        assert INSTANCE_YAML[section] == repo[section], section
    assert LAUNCHER_CONFIG["instance_config_map"] == "dagster-instance"
    assert LAUNCHER_CONFIG["service_account_name"] == "export-pipeline"
    assert the("ServiceAccount", LAUNCHER_CONFIG["service_account_name"])


# --- The run's pod --------------------------------------------------------------------------------


def test_a_runs_pod_is_labelled_isolated_and_configured_like_the_deployments(
    launched: Launch,
) -> None:
    spec = launched.pod["spec"]
    assert spec["serviceAccountName"] == "export-pipeline"
    [run] = spec["containers"]
    # The code server's Python runs the run: `python -m dagster api execute_run <the run>`.
    assert run["args"][1:5] == ["-m", "dagster", "api", "execute_run"]
    assert {"name": "DAGSTER_HOME", "value": LAUNCHER_CONFIG["dagster_home"]} in run["env"]
    labels = launched.pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "export-pipeline"
    assert labels["app.kubernetes.io/component"] == "run-worker"
    assert launched.namespace == NAMESPACE


def test_a_runs_tags_cannot_change_its_pod(
    k8s_instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whoever launches a run sets its tags: pointing INFLUXDB_URL at a host of theirs would hand
    # them the token, and another service account the daemon's permissions.
    for config in (
        '{"container_config": {"env": [{"name": "INFLUXDB_URL", "value": "http://x"}]}}',
        '{"pod_spec_config": {"service_account_name": "dagster-daemon"}}',
    ):
        with pytest.raises(Exception, match="allowed list"):
            launch_run(k8s_instance, monkeypatch, {"dagster-k8s/config": config})


# --- RBAC -----------------------------------------------------------------------------------------


def granted(service_account: str) -> set[tuple[str, str, str]]:
    """The (API group, resource, verb) the Roles bound to `service_account` grant."""
    grants = set()
    for binding in of_kind("RoleBinding"):
        subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]}
        if ("ServiceAccount", service_account, NAMESPACE) not in subjects:
            continue
        role = the(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            grants |= {
                (group, resource, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    return grants


def test_each_service_account_may_do_what_the_launcher_does_for_it_and_no_more(
    launched: Launch,
) -> None:
    # The daemon launches runs and, for a cancelled backfill, terminates them; the operators' UI
    # terminates a running run. Run monitoring (jobs/status, logs, events) is off.
    assert granted(pod_spec("dagster-daemon")["serviceAccountName"]) == (
        launched.launch_permissions | launched.terminate_permissions
    )
    assert granted(pod_spec("dagster-webserver-operator")["serviceAccountName"]) == (
        launched.terminate_permissions
    )
    assert launched.launch_permissions == {("batch", "jobs", "create")}
    for name in ("dagster-webserver", "code-server", "health"):
        assert granted(pod_spec(name)["serviceAccountName"]) == set(), name
    assert granted(LAUNCHER_CONFIG["service_account_name"]) == set()
    assert "run_monitoring" not in INSTANCE_YAML
    assert of_kind("ClusterRole") == of_kind("ClusterRoleBinding") == []


# --- NetworkPolicies ------------------------------------------------------------------------------

POLICIES = of_kind("NetworkPolicy")
INGRESS_CONTROLLER = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
MONITOR = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})


def pods(launched: Launch) -> dict[str, Pod]:
    return {
        name: Pod(NAMESPACE, template["metadata"]["labels"])
        for name, template in pod_templates(launched).items()
    }


def test_the_read_only_webserver_is_reached_from_the_ingress_controller_alone(
    launched: Launch,
) -> None:
    ours = pods(launched)
    _, port, _ = ingress_backend()
    assert ingress_allowed(POLICIES, ours["dagster-webserver"], INGRESS_CONTROLLER, port)
    assert not ingress_allowed(POLICIES, ours["dagster-webserver"], INGRESS_CONTROLLER, 4000)
    for source in (MONITOR, Pod("default", {}), *ours.values()):
        assert not ingress_allowed(POLICIES, ours["dagster-webserver"], source, port)


def test_the_code_server_is_reached_from_dagsters_own_pods_alone(launched: Launch) -> None:
    ours = pods(launched)
    target = ours["code-server"]
    for name in ("dagster-webserver", "dagster-webserver-operator", "dagster-daemon", "run"):
        assert ingress_allowed(POLICIES, target, ours[name], 4000), name
        assert not ingress_allowed(POLICIES, target, ours[name], 4001), name
    strangers = [
        ours["health"],
        ours["code-server"],
        Pod(NAMESPACE, {"app": "debug"}),
        INGRESS_CONTROLLER,
        MONITOR,
        # The daemon's labels in another namespace are not the daemon.
        Pod("other", dict(ours["dagster-daemon"].labels)),
    ]
    for source in strangers:
        assert not ingress_allowed(POLICIES, target, source, 4000), source


def test_nothing_reaches_the_operators_ui_the_daemon_or_a_run(launched: Launch) -> None:
    ours = pods(launched)
    sources = [INGRESS_CONTROLLER, MONITOR, Pod("default", {}), *ours.values()]
    for name in ("dagster-webserver-operator", "dagster-daemon", "run"):
        for source in sources:
            for port in (3000, 4000, 8080):
                assert not ingress_allowed(POLICIES, ours[name], source, port), (name, source)


def test_the_health_service_is_reached_from_monitoring_alone(launched: Launch) -> None:
    ours = pods(launched)
    assert ingress_allowed(POLICIES, ours["health"], MONITOR, 8080)
    for source in (INGRESS_CONTROLLER, Pod("default", {}), *ours.values()):
        assert not ingress_allowed(POLICIES, ours["health"], source, 8080), source


def test_every_pod_is_isolated_by_the_default_deny(launched: Launch) -> None:
    stranger = Pod("elsewhere", {})
    new_pod = Pod(NAMESPACE, {"app.kubernetes.io/name": "something-new"})
    assert not ingress_allowed(POLICIES, new_pod, stranger, 80)
    assert all(p["spec"].get("policyTypes") == ["Ingress"] for p in POLICIES)


# --- kustomize, where kubectl is installed --------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not installed")
def test_kustomize_builds_these_objects_and_an_overlays_image_reaches_the_runs(
    tmp_path: Path,
) -> None:
    def build(path: Path) -> list[dict[str, Any]]:
        done = subprocess.run(
            ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True
        )
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    built = build(BASE)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in built) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in OBJECTS
    )
    for obj in built:
        assert obj["metadata"].get("namespace") == (
            None if obj["kind"] in CLUSTER_SCOPED else NAMESPACE
        )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(BASE, overlay)],  # kustomize wants it relative
                "images": [
                    {"name": "export-pipeline", "newName": "registry.example/ep", "newTag": "9.9"}
                ],
            }
        )
    )
    deployments = [o for o in build(overlay) if o["kind"] == "Deployment"]
    images = {
        value
        for d in deployments
        for c in d["spec"]["template"]["spec"]["containers"]
        for value in [c["image"], *(e.get("value") for e in c.get("env", []))]
        if value and ("export-pipeline" in value or "registry.example" in value)
    }
    assert images == {"registry.example/ep:9.9"}
    code_server = next(d for d in deployments if d["metadata"]["name"] == "code-server")
    [each] = code_server["spec"]["template"]["spec"]["containers"]
    assert {"name": "DAGSTER_CURRENT_IMAGE", "value": "registry.example/ep:9.9"} in each["env"]
