"""The Kubernetes manifests (deploy/k8s), rendered the way they are applied.

Every overlay renders with ``kubectl kustomize`` and validates offline: Kubernetes kinds
against the schemas kubernetes-validate ships, custom resources against the JSON Schemas in
deploy/k8s/crd-schemas/. Then the rules the issue asks for: every service is deployed with
probes, resources and a restricted securityContext; consumers stay within their partitions;
every registry topic (dead-letter topics included) has its KafkaTopic; no Secret carries data.
The checks are plain functions, and the last tests feed them broken manifests to show they fail.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import subprocess
from typing import Any, get_args

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from pydantic import SecretStr

from leadwerk_platform.deploy import STRIMZI_CLUSTER, consumer_partitions
from leadwerk_platform.registry import ContractRegistry
from leadwerk_platform.services import SERVICES, ServiceSpec
from leadwerk_platform.settings import PlatformSettings, repository_root

Doc = dict[str, Any]

ROOT = repository_root()
K8S = ROOT / "deploy" / "k8s"
CRD_SCHEMAS = K8S / "crd-schemas"
#: The Kubernetes release whose schemas the manifests must satisfy (the oldest we support).
KUBERNETES_VERSION = "1.34"
#: API groups whose kinds are validated against deploy/k8s/crd-schemas/.
CRD_GROUPS = {"kafka.strimzi.io", "monitoring.coreos.com", "postgresql.cnpg.io"}
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir()
                  if (path / "kustomization.yaml").exists())
#: uvicorn's graceful shutdown (leadwerk_platform.serve): a pod must be given longer.
DRAIN_SECONDS = 20
#: The one writable path in a pod (an emptyDir; the image sends faust and HOME there).
WRITABLE = "/tmp"  # noqa: S108 - a mount point, not a temporary file


@functools.cache
def _rendered(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed to render deploy/k8s (CI must have it)")
        pytest.skip("kubectl is not installed: https://kubernetes.io/docs/tasks/tools/")
    result = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[Doc]:
    """The overlay's documents (a fresh copy: tests may change them)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it
    return [doc for doc in yaml.load_all(_rendered(overlay), Loader=loader) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    overlay: str = request.param
    return render(overlay)


@pytest.fixture(scope="module")
def registry() -> ContractRegistry:
    return ContractRegistry.load(ROOT / "schemas")


# --- the checks ---------------------------------------------------------------------------

@functools.cache
def _crd_validator(group: str, kind: str, version: str) -> jsonschema.protocols.Validator | None:
    path = CRD_SCHEMAS / group / f"{kind.lower()}_{version}.json"
    if not path.exists():
        return None
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    # Against the metaschema, but without compiling patterns: CRDs carry Go regular
    # expressions (PrometheusRule's "^(?i)…"), which Python compiles only where they apply.
    errors = [error.message for error in cls(cls.META_SCHEMA).iter_errors(schema)]
    assert not errors, f"{path}: {errors}"
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def schema_problems(doc: Doc) -> list[str]:
    """``doc`` against its Kubernetes or CRD schema (strict: unknown fields are errors)."""
    kind, api_version = doc.get("kind", "?"), doc.get("apiVersion", "?")
    name = f"{kind}/{doc.get('metadata', {}).get('name')}"
    group, _, version = api_version.rpartition("/")
    if group in CRD_GROUPS:
        validator = _crd_validator(group, kind, version)
        if validator is None:
            return [f"{name}: no schema for {api_version} {kind} in {CRD_SCHEMAS}"]
        return [f"{name}: {'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
                for error in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {'/'.join(map(str, error.path))}: {error.message[:200]}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{name}: {error.message}"]
    return []


def _pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def restricted_problems(context: Doc, pod_context: Doc) -> list[str]:
    """What breaks the restricted Pod Security Standard (a container's settings win over the
    pod's, as in Kubernetes)."""
    def setting(key: str) -> Any:
        return context.get(key, pod_context.get(key))

    capabilities = context.get("capabilities", {})
    rules = (
        (setting("runAsNonRoot") is True, "runAsNonRoot must be true"),
        (setting("runAsUser") != 0, "must not run as root (runAsUser 0)"),
        (context.get("allowPrivilegeEscalation") is False,
         "allowPrivilegeEscalation must be false"),
        (not context.get("privileged"), "must not be privileged"),
        ("ALL" in capabilities.get("drop", []), "capabilities must drop ALL"),
        (not capabilities.get("add"), "must not add capabilities"),
        (context.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true"),
        ((setting("seccompProfile") or {}).get("type") == "RuntimeDefault",
         "seccompProfile must be RuntimeDefault"),
    )
    return [message for ok, message in rules if not ok]


def pod_problems(doc: Doc) -> list[str]:
    """Resources, the restricted securityContext and the read-only root file system."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    pod = _pod_spec(doc)
    problems = []
    if pod.get("enableServiceLinks") is not False:
        problems.append(f"{name}: enableServiceLinks must be false (service links set "
                        "LEADWERK_<SERVICE>_PORT=tcp://…)")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: automountServiceAccountToken must be false")
    scratch = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
    for container in pod["containers"] + pod.get("initContainers", []):
        where = f"{name}/{container['name']}"
        resources = container.get("resources", {})
        problems += [f"{where}: no resources.{part}.{key}"
                     for part in ("requests", "limits") for key in ("cpu", "memory")
                     if key not in resources.get(part, {})]
        problems += [f"{where}: {problem}" for problem in restricted_problems(
            container.get("securityContext", {}), pod.get("securityContext", {}))]
        if not any(mount["mountPath"] == WRITABLE and mount["name"] in scratch
                   for mount in container.get("volumeMounts", [])):
            problems.append(f"{where}: {WRITABLE} must be a writable emptyDir")
    return problems


def _by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _env(container: Doc) -> dict[str, Doc]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def _probe_problems(where: str, container: Doc) -> list[str]:
    problems = []
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        http = container.get(probe, {}).get("httpGet", {})
        if (http.get("path"), http.get("port")) != (path, "http"):
            problems.append(f"{where}: {probe} must GET {path} on port http")
    return problems


def service_problems(docs: list[Doc], service: ServiceSpec) -> list[str]:
    """The service's Deployment (command, port, probes, shutdown) and Service."""
    name = f"leadwerk-{service.name}"
    deployment = _by_kind(docs, "Deployment").get(name)
    if deployment is None:
        return [f"{service.name}: no Deployment {name}"]
    pod = _pod_spec(deployment)
    container = pod["containers"][0]
    where = f"Deployment/{name}"
    problems = _probe_problems(where, container)
    if container.get("command") != ["python", "-m", service.module]:
        problems.append(f"{where}: command must be python -m {service.module}")
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    port_value = _env(container).get(service.port_variable, {}).get("value")
    if "http" not in ports or port_value != str(ports["http"]):
        problems.append(f"{where}: {service.port_variable} must equal the http containerPort")
    if service.migrations is not None and "secretKeyRef" not in (
            _env(container).get("DATABASE_URL", {}).get("valueFrom", {})):
        problems.append(f"{where}: DATABASE_URL must come from a Secret")
    stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if pod.get("terminationGracePeriodSeconds", 30) <= stop + DRAIN_SECONDS:
        problems.append(f"{where}: terminationGracePeriodSeconds must exceed preStop + "
                        f"{DRAIN_SECONDS} s of draining")
    svc = _by_kind(docs, "Service").get(name)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    if svc is None:
        problems.append(f"{service.name}: no Service {name}")
    elif not (svc["spec"]["selector"].items() <= pod_labels.items()
              and any(port.get("name") == "http" for port in svc["spec"]["ports"])):
        problems.append(f"Service/{name}: must select the pods and name its port http")
    return problems


def monitoring_problems(docs: list[Doc]) -> list[str]:
    """The ServiceMonitor scrapes every service's Service on its http port."""
    monitors = _by_kind(docs, "ServiceMonitor").values()
    services = _by_kind(docs, "Service")
    problems = []
    for service in SERVICES:
        svc = services.get(f"leadwerk-{service.name}")
        labels = (svc or {}).get("metadata", {}).get("labels", {})
        if not any(monitor["spec"]["selector"].get("matchLabels", {}).items() <= labels.items()
                   and any(endpoint.get("port") == "http" and endpoint.get("path") == "/metrics"
                           for endpoint in monitor["spec"]["endpoints"])
                   for monitor in monitors):
            problems.append(f"{service.name}: no ServiceMonitor scrapes its /metrics")
    return problems


def scaling_problems(docs: list[Doc], ceilings: dict[str, int]) -> list[str]:
    """No consumer Deployment (or autoscaler of one) beyond its input topics' partitions."""
    problems = []
    deployments = _by_kind(docs, "Deployment")
    autoscalers = {doc["spec"]["scaleTargetRef"]["name"]: doc
                   for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"}
    for service, ceiling in ceilings.items():
        name = f"leadwerk-{service}"
        replicas = deployments.get(name, {}).get("spec", {}).get("replicas", 1)
        most = autoscalers[name]["spec"]["maxReplicas"] if name in autoscalers else replicas
        if max(replicas, most) > ceiling:
            problems.append(f"{name}: {max(replicas, most)} replicas, but its input topics "
                            f"have at most {ceiling} partitions")
    return problems


def topic_problems(docs: list[Doc], registry: ContractRegistry) -> list[str]:
    """One KafkaTopic per registry topic, for the overlay's Kafka, within its brokers."""
    topics = _by_kind(docs, "KafkaTopic")
    clusters = set(_by_kind(docs, "Kafka"))
    problems = [f"{name}: no KafkaTopic" for name in sorted(set(registry.topics) - set(topics))]
    problems += [f"{name}: KafkaTopic without a registry topic"
                 for name in sorted(set(topics) - set(registry.topics))]
    for name, doc in sorted(topics.items()):
        cluster = doc["metadata"].get("labels", {}).get("strimzi.io/cluster")
        brokers = sum(pool["spec"]["replicas"] for pool in docs
                      if pool["kind"] == "KafkaNodePool" and "broker" in pool["spec"]["roles"]
                      and pool["metadata"]["labels"].get("strimzi.io/cluster") == cluster)
        spec = doc["spec"]
        if clusters and cluster not in clusters:
            problems.append(f"{name}: strimzi.io/cluster {cluster!r} is not this overlay's Kafka")
        if name in registry.topics and spec["partitions"] != registry.topics[name].partitions:
            problems.append(f"{name}: partitions differ from schemas/topics/{name}.yaml")
        if clusters and not spec["replicas"] <= brokers:
            problems.append(f"{name}: {spec['replicas']} replicas on {brokers} brokers")
        if int(spec.get("config", {}).get("min.insync.replicas", 1)) > spec["replicas"]:
            problems.append(f"{name}: min.insync.replicas above its replicas")
    return problems


@functools.cache
def secret_settings() -> frozenset[str]:
    """Every environment variable a service reads into a SecretStr setting."""
    for service in SERVICES:
        importlib.import_module(f"{service.module}.settings")
    names = set()
    pending: list[type[PlatformSettings]] = [PlatformSettings]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        for field in cls.model_fields.values():
            if SecretStr in (field.annotation, *get_args(field.annotation)) and field.alias:
                names.add(field.alias)
    return frozenset(names)


def secret_problems(docs: list[Doc]) -> list[str]:
    """No Secret in the manifests, and no secret setting as plain configuration."""
    problems = [f"Secret/{doc['metadata']['name']} carries data: create it out of band"
                for doc in docs if doc["kind"] == "Secret"
                and (doc.get("data") or doc.get("stringData"))]
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            problems += [f"ConfigMap/{doc['metadata']['name']}: {key} is a secret"
                         for key in doc.get("data", {}) if key in secret_settings()]
        if doc["kind"] in ("Deployment", "Job"):
            problems += [f"{doc['kind']}/{doc['metadata']['name']}: {name} set in plain text"
                         for container in _pod_spec(doc)["containers"]
                         for name, variable in _env(container).items()
                         if name in secret_settings() and "value" in variable]
    return problems


# --- the manifests as rendered --------------------------------------------------------------

def test_overlays_exist() -> None:
    assert {"single-node", "production"} <= set(OVERLAYS)


def test_every_document_validates_against_its_schema(docs: list[Doc]) -> None:
    assert [problem for doc in docs for problem in schema_problems(doc)] == []


def test_everything_lands_in_the_leadwerk_namespace(docs: list[Doc]) -> None:
    """Pods, the Kafka and Postgres clusters and their topics find each other by short name,
    and the operators watch one namespace: an overlay's own resources must land there too."""
    cluster_wide = {"Namespace"}
    assert [f"{d['kind']}/{d['metadata']['name']}" for d in docs
            if d["kind"] not in cluster_wide
            and d["metadata"].get("namespace") != "leadwerk"] == []


def test_every_service_is_deployed_with_probes_and_a_service(docs: list[Doc]) -> None:
    assert [problem for service in SERVICES for problem in service_problems(docs, service)] == []


def test_every_pod_is_restricted_with_resources(docs: list[Doc]) -> None:
    workloads = [doc for doc in docs if doc["kind"] in ("Deployment", "Job")]
    assert len(workloads) == len(SERVICES) + 1  # the services and the bootstrap Job
    assert [problem for doc in workloads for problem in pod_problems(doc)] == []


def test_bootstrap_job_runs_the_set_up_command(docs: list[Doc]) -> None:
    job = _by_kind(docs, "Job")["leadwerk-bootstrap"]
    container = _pod_spec(job)["containers"][0]
    assert container["command"] == ["python", "-m", "leadwerk_platform.bootstrap"]
    assert "secretKeyRef" in _env(container)["DATABASE_URL"]["valueFrom"]


def test_ingest_drains_behind_a_service_with_an_autoscaler(docs: list[Doc]) -> None:
    ingest = _pod_spec(_by_kind(docs, "Deployment")["leadwerk-ingest"])["containers"][0]
    assert ingest["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    autoscaler = _by_kind(docs, "HorizontalPodAutoscaler")["leadwerk-ingest"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "leadwerk-ingest"


def test_every_deployment_has_a_disruption_budget(docs: list[Doc]) -> None:
    budgets = [doc["spec"]["selector"]["matchLabels"] for doc in docs
               if doc["kind"] == "PodDisruptionBudget"]
    for name, deployment in _by_kind(docs, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(selector.items() <= labels.items() for selector in budgets), name


def test_every_service_is_scraped(docs: list[Doc]) -> None:
    assert monitoring_problems(docs) == []


def test_consumers_stay_within_their_partitions(docs: list[Doc],
                                                registry: ContractRegistry) -> None:
    ceilings = consumer_partitions(registry)
    assert {service.name for service in SERVICES} - {"ingest"} <= set(ceilings)
    assert scaling_problems(docs, ceilings) == []


def test_every_registry_topic_has_its_kafka_topic(docs: list[Doc],
                                                  registry: ContractRegistry) -> None:
    assert _by_kind(docs, "Kafka"), "the overlay brings its Strimzi Kafka cluster"
    assert set(_by_kind(docs, "Kafka")) == {STRIMZI_CLUSTER}
    assert topic_problems(docs, registry) == []


def test_no_secret_in_the_manifests(docs: list[Doc]) -> None:
    assert {"DATABASE_URL", "LEADWERK_SECRET_KEY", "LEADWERK_ADMIN_TOKEN",
            "LEADWERK_SMTP_URL"} <= secret_settings()
    assert secret_problems(docs) == []


def test_every_crd_schema_says_where_it_came_from() -> None:
    readme = (CRD_SCHEMAS / "README.md").read_text()
    for path in sorted(CRD_SCHEMAS.rglob("*.json")):
        assert str(path.relative_to(CRD_SCHEMAS)) in readme, path


# --- the checks fail on broken manifests ----------------------------------------------------

@pytest.fixture
def production() -> list[Doc]:
    return render("production")


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    return _by_kind(docs, kind)[name]


def _container(docs: list[Doc], name: str) -> Doc:
    container: Doc = _pod_spec(_find(docs, "Deployment", name))["containers"][0]
    return container


def test_schema_check_rejects_unknown_fields(production: list[Doc]) -> None:
    _container(production, "leadwerk-ingest")["livenessProbe"]["path"] = "/healthz"
    _find(production, "KafkaTopic", "contact-events")["spec"]["retention"] = "7d"
    _find(production, "Cluster", "leadwerk-db")["spec"]["instances"] = 0
    problems = [problem for doc in production for problem in schema_problems(doc)]
    assert len(problems) == 3, problems
    unknown: Doc = {"apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaConnect",
                    "metadata": {"name": "x"}}
    assert "no schema" in schema_problems(unknown)[0]


def test_service_check_finds_missing_probes_and_a_wrong_port(production: list[Doc]) -> None:
    scoring = next(s for s in SERVICES if s.name == "scoring")
    container = _container(production, "leadwerk-scoring")
    del container["startupProbe"]
    container["env"] = [v for v in container["env"] if v["name"] != scoring.port_variable]
    problems = service_problems(production, scoring)
    assert any("startupProbe" in p for p in problems), problems
    assert any(scoring.port_variable in p for p in problems), problems
    production.remove(_find(production, "Deployment", "leadwerk-scoring"))
    assert service_problems(production, scoring) == ["scoring: no Deployment leadwerk-scoring"]


def test_pod_check_finds_what_breaks_the_restricted_profile(production: list[Doc]) -> None:
    deployment = _find(production, "Deployment", "leadwerk-mailer")
    container = _pod_spec(deployment)["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    del container["resources"]["limits"]
    problems = pod_problems(deployment)
    assert len(problems) == 5, problems  # rootfs, drop ALL, add, cpu and memory limits


def test_scaling_check_finds_consumers_beyond_their_partitions(
        production: list[Doc], registry: ContractRegistry) -> None:
    ceilings = consumer_partitions(registry)
    _find(production, "Deployment", "leadwerk-mailer")["spec"]["replicas"] = ceilings["mailer"] + 1
    assert [p.split(":")[0] for p in scaling_problems(production, ceilings)] == ["leadwerk-mailer"]


def test_topic_check_finds_a_missing_topic_and_too_many_replicas(
        production: list[Doc], registry: ContractRegistry) -> None:
    production.remove(_find(production, "KafkaTopic", "email-events-dlq"))
    _find(production, "KafkaTopic", "crm-events")["spec"]["replicas"] = 4
    problems = topic_problems(production, registry)
    assert problems == ["email-events-dlq: no KafkaTopic", "crm-events: 4 replicas on 3 brokers"]


def test_secret_check_finds_data_and_plain_text_secrets(production: list[Doc]) -> None:
    production.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                       "stringData": {"LEADWERK_SECRET_KEY": "x"}})
    _container(production, "leadwerk-ingest")["env"].append(
        {"name": "LEADWERK_ADMIN_TOKEN", "value": "x"})
    assert len(secret_problems(production)) == 2

