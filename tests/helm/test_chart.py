"""The chart as a user meets it: lint, the schema's refusals, manifests a cluster accepts, and the
configuration it renders read back by the provider's own code."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from airflow_modelopt import config
from airflow_modelopt.specs import EXECUTION_MODES, StepSpec
from airflow_modelopt.version import __version__
from tests.conftest import UNREACHABLE_KUBECONFIG
from tests.helm.conftest import (
    CHART,
    EXTERNAL_VALUES,
    IN_CLUSTER_URI,
    KUBE_VERSION,
    MLFLOW,
    NAMESPACE,
    POSTGRESQL,
    RELEASE,
    Helm,
    Manifests,
)

AUTH_SECRET = f"{MLFLOW}-auth"
STEP_CREDENTIALS = f"{MLFLOW}-credentials"

pytestmark = pytest.mark.helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())

#: What the cncf.kubernetes provider's KubernetesPodOperator calls in the step namespace, as
#: launchers.py uses it (do_xcom_push, get_logs, on_finish_action=delete_succeeded_pod):
POD_LAUNCHER_RULES = {
    # create_namespaced_pod; read/list (find the pod again on retry) and watch its phase;
    # patch_namespaced_pod labels it when done; delete_namespaced_pod on success and on_kill.
    "pods": {"create", "get", "list", "watch", "patch", "delete"},
    "pods/log": {"get"},  # read_namespaced_pod_log: the step's log in the task log
    # connect_get_namespaced_pod_exec: cat /airflow/xcom/return.json in the xcom sidecar, then
    # stop it. A websocket GET: "get" before Kubernetes 1.30, also "create" since.
    "pods/exec": {"create", "get"},
    "events": {"list", "watch"},  # list_namespaced_event (sync), watch in the triggerer
}


def values_sets() -> list[Any]:
    return [pytest.param([], id="default"), pytest.param(["-f", str(EXTERNAL_VALUES)], id="external-db-object-store")]


# --- lint, offline validation ---------------------------------------------------------------

@pytest.mark.parametrize("args", values_sets())
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_passes(helm: Helm, args: list[str], strict: bool) -> None:
    proc = helm.run("lint", str(CHART), *(["--strict"] if strict else []), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("args", values_sets())
def test_rendered_manifests_validate_against_kubernetes(helm: Helm, args: list[str]) -> None:
    """Every document is a valid object of that Kubernetes version, unknown fields refused."""
    manifests = helm.render(*args)
    assert manifests
    for doc in manifests:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_chart_is_released_with_the_provider(default_manifests: Manifests) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == chart["appVersion"] == __version__
    # step images default to the provider version the chart ships with
    assert default_manifests.config()["AIRFLOW__MODELOPT__IMAGE_TAG"] == __version__


# --- the schema is the contract -------------------------------------------------------------

@pytest.mark.parametrize(("args", "field", "says"), [
    (["--set", "provider.executionMode=k8s"], r"provider[./]executionMode", "kubernetes"),
    (["--set", "mlfow.enabled=true"], r"mlfow", "additional propert"),
    (["--set-string", "mlflow.port=5000"], r"mlflow[./]port", "integer"),
    (["--set-string", "provider.mlflowConnectRetries=five"], r"provider[./]mlflowConnectRetries", "integer"),
    (["--set", "stepImages.overrides.torch_to_onx=my/torch:1"], r"torch_to_onx", "torch_to_onnx"),
    (["--set", "provider.mlflowConnId=mlflow-prod"], r"provider[./]mlflowConnId", "pattern"),
    (["--set", "mlflow.auth.mode=oauth"], r"mlflow[./]auth[./]mode", "basic-auth"),
    (["--set-string", "mlflow.auth.admin.password=short"], r"mlflow[./]auth[./]admin[./]password", "pattern"),
    (["--set", "mlflow.auth.defaultPermission=WRITE"], r"mlflow[./]auth[./]defaultPermission", "READ"),
    (["--set", "networkPolicy.airflowPeers[0].podselector.tier=airflow"], r"networkPolicy[./]airflowPeers[./]0", "podselector"),
    (["--set-string", "networkPolicy.enabled=yes"], r"networkPolicy[./]enabled", "boolean"),
], ids=["bad-execution-mode", "unknown-top-level-key", "string-for-int", "string-for-retries",
        "override-of-unknown-step", "conn-id-not-an-env-name", "unknown-auth-mode", "admin-password-too-short",
        "unknown-permission", "misspelt-peer-selector", "string-for-networkpolicy-switch"])
def test_schema_refuses_bad_values_naming_the_field(helm: Helm, args: list[str], field: str, says: str) -> None:
    error = helm.refuse(*args)
    assert "schema" in error, error
    assert re.search(field, error), error
    assert says in error, error


@pytest.mark.parametrize(("args", "says"), [
    (["--set", "postgresql.enabled=false"], "externalDatabase.existingSecret"),
    (["--set", "mlflow.enabled=false"], "connection.trackingUri"),
    (["--set", "mlflow.replicas=2"], "ReadWriteMany"),
    (["--set", "mlflow.auth.mode=none", "--set", "networkPolicy.enabled=false"], "networkPolicy"),
    (["--set", "mlflow.auth.mode=proxy", "--set", "connection.trackingUri=https://mlflow.example.com"],
     "networkPolicy.proxyPeers"),
    (["--set", "mlflow.auth.mode=proxy", "--set", "networkPolicy.enabled=false"], "connection.trackingUri"),
    (["--set", "mlflow.auth.existingSecret=mlflow-admin"], "mlflow.auth.existingSecret"),
], ids=["external-db-without-secret", "no-mlflow-without-uri", "replicas-on-rwo-claim",
        "no-auth-and-no-network-policy", "proxy-without-its-peers", "proxy-without-its-url",
        "admin-secret-not-readable"])
def test_incomplete_values_fail_with_what_to_set(helm: Helm, args: list[str], says: str) -> None:
    assert says in helm.refuse(*args)


def test_schema_enums_are_the_providers() -> None:
    props = SCHEMA["properties"]
    assert props["provider"]["properties"]["executionMode"]["enum"] == list(EXECUTION_MODES)
    assert sorted(props["stepImages"]["properties"]["overrides"]["propertyNames"]["enum"]) == sorted(StepSpec.registry)
    assert SCHEMA["$schema"].startswith("http://json-schema.org/draft-07/")


def test_every_value_is_in_the_schema_and_documented() -> None:
    """Each key of values.yaml carries a `# --` comment (or is a group of such keys), and the
    schema describes it: the two files are one contract."""
    text = (CHART / "values.yaml").read_text().splitlines()
    lines: dict[tuple[str, ...], int] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(text):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        lines[tuple(key for _, key in stack)] = number

    def check(node: dict[str, Any], path: tuple[str, ...]) -> int:
        assert path in lines, f"{'.'.join(path)} is in the schema but not in values.yaml"
        assert node.get("description"), f"{'.'.join(path)} has no description in the schema"
        above = lines[path]
        while above > 0 and text[above - 1].strip().startswith("#"):
            above -= 1
        if above < lines[path] and text[above].strip().startswith("# --"):
            return 1
        assert "properties" in node, f"{'.'.join(path)} has no `# --` comment in values.yaml"
        return sum(check(sub, (*path, key)) for key, sub in node["properties"].items())

    documented = sum(check(sub, (key,)) for key, sub in SCHEMA["properties"].items() if key != "global")
    assert documented > 60


# --- the configuration the provider reads -----------------------------------------------------

@pytest.mark.parametrize("manifests_fixture", ["default_manifests", "external_manifests"])
def test_every_rendered_option_is_a_provider_option(manifests_fixture: str, request: pytest.FixtureRequest) -> None:
    data = request.getfixturevalue(manifests_fixture).config()
    assert data
    for key in data:
        assert key.startswith("AIRFLOW__MODELOPT__"), key
        assert key.removeprefix("AIRFLOW__MODELOPT__").lower() in config.OPTIONS, f"{key} is no [modelopt] option"


def _step_pod(tmp_path: Path, tracking: Any) -> Any:
    """The pod the provider's Kubernetes launcher builds for a step under the current config."""
    from airflow_modelopt.operators import TorchToOnnxOperator
    from airflow_modelopt.operators.launchers import KubernetesLauncher

    (tmp_path / "kubeconfig").write_text(UNREACHABLE_KUBECONFIG)
    operator = TorchToOnnxOperator(task_id="export", model_uri="runs:/r1/model/model.pt2", data_uri="runs:/r1/data/eval.npz",
                                   kubernetes_kwargs={"config_file": str(tmp_path / "kubeconfig"), "in_cluster": False})
    request = operator.launch_request(operator.build_spec(None, mode="kubernetes"), tracking)
    spec = request.spec_for_image(request.resolved_image())
    return KubernetesLauncher(request).build_operator(spec).build_pod_request_obj()


def _load_into_env(monkeypatch: pytest.MonkeyPatch, manifests: Manifests) -> None:
    for key in [k for k in os.environ if k.startswith("AIRFLOW__MODELOPT__")]:
        monkeypatch.delenv(key)
    for key, value in manifests.config().items():
        monkeypatch.setenv(key, value)
    for key, value in manifests.secret_data(f"{RELEASE}-connection").items():
        monkeypatch.setenv(key, value)


def test_default_config_round_trips_into_the_provider(monkeypatch: pytest.MonkeyPatch, default_manifests: Manifests) -> None:
    from airflow_modelopt.hooks.mlflow import MlflowHook

    _load_into_env(monkeypatch, default_manifests)
    assert config.resolve_execution_mode(None) == "kubernetes"
    assert config.image_for("torch_to_onnx") == f"airflow-modelopt-torch:{__version__}"
    assert config.image_for("onnx_quantize") == f"airflow-modelopt-base:{__version__}"
    k8s = config.KubernetesSettings.from_config()
    assert k8s == config.KubernetesSettings(namespace=NAMESPACE, service_account=f"{RELEASE}-steps",
                                            mlflow_secret=STEP_CREDENTIALS, in_cluster=True, conn_id="kubernetes_default")
    # the connection Airflow reads from the environment points at the chart's MLflow Service and
    # carries the admin account MLflow's basic-auth app is started with
    tracking = MlflowHook().tracking_config(fallback_to_local=False)
    assert tracking.tracking_uri == IN_CLUSTER_URI and tracking.is_remote
    admin = default_manifests.secret_data(AUTH_SECRET)
    assert tracking.secret_env == {"MLFLOW_TRACKING_USERNAME": admin["username"], "MLFLOW_TRACKING_PASSWORD": admin["password"]}
    # ... and so does the Secret the step pods take their environment from
    assert default_manifests.secret_data(STEP_CREDENTIALS) == tracking.secret_env
    service = default_manifests.one("Service", MLFLOW)
    assert tracking.tracking_uri.endswith(f":{service['spec']['ports'][0]['port']}")


def test_external_config_shapes_the_step_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             external_manifests: Manifests, external_values: dict[str, Any]) -> None:
    """The provider builds its pod from the rendered config: namespace, ServiceAccount, image, Secret."""
    from airflow_modelopt.hooks.mlflow import MlflowHook

    _load_into_env(monkeypatch, external_manifests)
    step_ns = external_values["provider"]["stepNamespace"]
    overrides = external_values["stepImages"]["overrides"]
    assert config.image_for("torch_to_onnx") == f"registry.example.com/ml/airflow-modelopt-torch:{__version__}"
    assert config.image_for("tensorrt_build") == overrides["tensorrt_build"]
    assert config.KubernetesSettings.from_config().in_cluster is True

    tracking = MlflowHook().tracking_config(fallback_to_local=False)
    pod = _step_pod(tmp_path, tracking)

    sa = external_manifests.one("ServiceAccount")
    assert pod.metadata.namespace == step_ns == sa["metadata"]["namespace"]
    assert pod.spec.service_account_name == sa["metadata"]["name"]
    assert [s["name"] for s in sa["imagePullSecrets"]] == external_values["stepImages"]["pullSecrets"]
    base = pod.spec.containers[0]
    assert base.image == f"registry.example.com/ml/airflow-modelopt-torch:{__version__}"
    # the step pods' MLflow credentials: the chart's Secret, in the step namespace
    assert [s.secret_ref.name for s in base.env_from] == [STEP_CREDENTIALS]
    step_secret = external_manifests.one("Secret", STEP_CREDENTIALS)
    assert step_secret["metadata"]["namespace"] == step_ns
    assert external_manifests.secret_data(STEP_CREDENTIALS) == tracking.secret_env != {}
    assert {e.name: e.value for e in base.env}["MLFLOW_TRACKING_URI"] == IN_CLUSTER_URI
    role = external_manifests.one("Role")
    assert role["metadata"]["namespace"] == step_ns  # Airflow may launch pods where the config sends them


# --- RBAC ------------------------------------------------------------------------------------

@pytest.mark.parametrize("manifests_fixture", ["default_manifests", "external_manifests"])
def test_rbac_grants_exactly_what_the_pod_operator_needs(manifests_fixture: str, request: pytest.FixtureRequest) -> None:
    manifests: Manifests = request.getfixturevalue(manifests_fixture)
    role = manifests.one("Role")
    granted: dict[str, set[str]] = {}
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], rule
        assert "resourceNames" not in rule
        for resource in rule["resources"]:
            granted.setdefault(resource, set()).update(rule["verbs"])
    assert granted == POD_LAUNCHER_RULES
    assert not manifests.all("ClusterRole") and not manifests.all("ClusterRoleBinding")

    binding = manifests.one("RoleBinding")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == manifests.config()["AIRFLOW__MODELOPT__KUBERNETES_NAMESPACE"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    # the official chart's worker and triggerer accounts of a release called "airflow"
    assert [(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]] == [
        ("ServiceAccount", "airflow-worker", NAMESPACE), ("ServiceAccount", "airflow-triggerer", NAMESPACE)]
    sa = manifests.one("ServiceAccount")
    assert sa["metadata"]["name"] == manifests.config()["AIRFLOW__MODELOPT__KUBERNETES_SERVICE_ACCOUNT"]
    assert sa["automountServiceAccountToken"] is False  # steps never call the API


# --- MLflow server and its database -----------------------------------------------------------

def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("manifests_fixture", ["default_manifests", "external_manifests"])
def test_mlflow_runs_as_non_root_and_probes_its_port(manifests_fixture: str, request: pytest.FixtureRequest) -> None:
    manifests: Manifests = request.getfixturevalue(manifests_fixture)
    pod = manifests.one("Deployment", MLFLOW)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
        assert c.get("securityContext", {}).get("runAsUser", 1) != 0, c["name"]
    mlflow = manifests.container("Deployment", MLFLOW, "mlflow")
    assert mlflow["command"] == ["mlflow", "server"]
    listen = int(_arg(mlflow["args"], "--port"))
    assert _arg(mlflow["args"], "--host") == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in mlflow["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = mlflow[probe]["httpGet"]
        assert get["path"] == "/health"
        assert ports.get(get["port"], get["port"]) == listen, f"{probe} checks a port mlflow does not listen on"
    service = manifests.one("Service", MLFLOW)
    target = service["spec"]["ports"][0]["targetPort"]
    assert ports.get(target, target) == listen
    assert "--serve-artifacts" in mlflow["args"]
    assert mlflow["resources"]["requests"] and mlflow["resources"]["limits"]


def test_bundled_database_secret_feeds_mlflow_and_postgres(helm: Helm) -> None:
    from sqlalchemy.engine import make_url

    password = "s3cr/t:p@ss%x"  # URL-special characters must survive the URI
    manifests = helm.render("--set-string", f"postgresql.auth.password={password}")
    secret = manifests.secret_data(POSTGRESQL)
    url = make_url(secret["backend-store-uri"])
    pg = manifests.container("StatefulSet", POSTGRESQL, "postgresql")
    env = {e["name"]: e for e in pg["env"]}
    assert url.drivername == "postgresql+psycopg2"  # explicit: SQLAlchemy 2.1 defaults to psycopg 3
    assert url.password == secret["password"] == password
    assert url.username == env["POSTGRES_USER"]["value"] and url.database == env["POSTGRES_DB"]["value"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": POSTGRESQL, "key": "password"}
    assert url.host == f"{POSTGRESQL}.{NAMESPACE}.svc.cluster.local"
    assert url.port == pg["ports"][0]["containerPort"] == manifests.one("Service", POSTGRESQL)["spec"]["ports"][0]["port"]
    assert manifests.one("StatefulSet")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mlflow = manifests.container("Deployment", MLFLOW, "mlflow")
    store = {e["name"]: e for e in mlflow["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert store["valueFrom"]["secretKeyRef"] == {"name": POSTGRESQL, "key": "backend-store-uri"}
    assert password not in json.dumps(mlflow) and "--backend-store-uri" not in mlflow["args"]
    # an empty password is generated, never left empty
    generated = helm.render().secret_data(POSTGRESQL)["password"]
    assert len(generated) >= 24


def test_external_database_mode_uses_the_named_secret(external_manifests: Manifests, external_values: dict[str, Any]) -> None:
    assert not external_manifests.all("StatefulSet")
    assert not [s for s in external_manifests.all("Secret") if "postgresql" in s["metadata"]["name"]]
    assert not [s for s in external_manifests.all("Service") if "postgresql" in s["metadata"]["name"]]
    pod = external_manifests.one("Deployment", MLFLOW)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["auth-config"]  # nothing waits for a bundled database
    mlflow = external_manifests.container("Deployment", MLFLOW, "mlflow")
    store = {e["name"]: e for e in mlflow["env"]}["MLFLOW_BACKEND_STORE_URI"]
    db = external_values["externalDatabase"]
    assert store["valueFrom"]["secretKeyRef"] == {"name": db["existingSecret"], "key": db["uriKey"]}
    # artifacts go to the object store: no claim, no volume, several replicas allowed
    assert _arg(mlflow["args"], "--artifacts-destination") == external_values["mlflow"]["artifacts"]["destination"]
    assert not external_manifests.all("PersistentVolumeClaim")
    assert [v["name"] for v in pod["volumes"]] == ["tmp", "auth-config"]  # no artifacts claim
    assert external_manifests.one("Deployment", MLFLOW)["spec"]["replicas"] == 2
    assert {"secretRef": {"name": "mlflow-s3-credentials"}} in mlflow["envFrom"]
    # users and permissions live in the database named for them, not in the backend store
    auth_db = {e["name"]: e for e in pod["initContainers"][0]["env"]}["MLFLOW_AUTH_DATABASE_URI"]
    named = external_values["mlflow"]["auth"]["database"]
    assert auth_db["valueFrom"]["secretKeyRef"] == {"name": named["existingSecret"], "key": named["uriKey"]}


def test_mlflow_accepts_the_host_names_clients_use(default_manifests: Manifests, external_manifests: Manifests) -> None:
    allowed = _arg(default_manifests.container("Deployment", MLFLOW, "mlflow")["args"], "--allowed-hosts").split(",")
    host = IN_CLUSTER_URI.split("//")[1]
    assert f"{host.split(':')[0]}:*" in allowed and "localhost:*" in allowed and "*" not in allowed
    extra = _arg(external_manifests.container("Deployment", MLFLOW, "mlflow")["args"], "--allowed-hosts").split(",")
    assert "mlflow.example.com" in extra


def test_external_tracking_server_without_mlflow(helm: Helm) -> None:
    manifests = helm.render("--set", "mlflow.enabled=false", "--set", "connection.trackingUri=https://mlflow.example.com")
    assert not manifests.all("Deployment") and not manifests.all("StatefulSet") and not manifests.all("PersistentVolumeClaim")
    assert manifests.secret_data(f"{RELEASE}-connection") == {"AIRFLOW_CONN_MLFLOW_DEFAULT": "https://mlflow.example.com"}


def test_install_notes_print_the_url_and_the_wiring(helm: Helm) -> None:
    if helm.version() < (3, 13):
        pytest.skip("helm install --dry-run=client needs helm 3.13+")
    proc = helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert IN_CLUSTER_URI in notes
    assert f"port-forward svc/{MLFLOW}" in notes
    assert "extraEnvFrom:" in notes and f"name: {RELEASE}-config" in notes and f"name: {RELEASE}-connection" in notes
    assert f'"airflow-modelopt[airflow]=={__version__}"' in notes


# --- MLflow authentication ------------------------------------------------------------------

def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def test_mlflow_runs_basic_auth_with_one_admin_everywhere(default_manifests: Manifests) -> None:
    """The server, Airflow's connection and the step pods' Secret name the same account, and the
    auth app gets its config file, admin and Flask key from Secrets, none on the command line."""
    from airflow.models.connection import Connection

    pod = default_manifests.one("Deployment", MLFLOW)["spec"]["template"]["spec"]
    mlflow = default_manifests.container("Deployment", MLFLOW, "mlflow")
    assert _arg(mlflow["args"], "--app-name") == "basic-auth"
    env = _env(mlflow)
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "username"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "password"}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "flask-secret-key"}
    # the init container writes the ini where the server reads it, into a memory-backed volume
    init = next(c for c in pod["initContainers"] if c["name"] == "auth-config")
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert _env(init)["MLFLOW_AUTH_CONFIG_PATH"]["value"] == ini
    mounts = {m["name"]: m for m in mlflow["volumeMounts"]}
    assert os.path.dirname(ini) == mounts["auth-config"]["mountPath"] and mounts["auth-config"]["readOnly"] is True
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["auth-config"] == os.path.dirname(ini)
    assert {v["name"]: v for v in pod["volumes"]}["auth-config"]["emptyDir"]["medium"] == "Memory"
    assert _env(init)["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"] == {"name": POSTGRESQL, "key": "backend-store-uri"}

    auth = default_manifests.secret_data(AUTH_SECRET)
    assert auth["username"] == "admin" and len(auth["password"]) >= 24 and len(auth["flask-secret-key"]) >= 32
    assert default_manifests.one("Secret", AUTH_SECRET)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # Airflow parses the variable as a URI
    conn = Connection(conn_id="mlflow_default", uri=default_manifests.secret_data(f"{RELEASE}-connection")["AIRFLOW_CONN_MLFLOW_DEFAULT"])
    assert (conn.login, conn.password) == (auth["username"], auth["password"])
    step = default_manifests.secret_data(STEP_CREDENTIALS)
    assert step == {"MLFLOW_TRACKING_USERNAME": auth["username"], "MLFLOW_TRACKING_PASSWORD": auth["password"]}
    assert auth["password"] not in json.dumps(mlflow) + json.dumps(init)


def test_a_given_admin_password_survives_the_connection_uri(monkeypatch: pytest.MonkeyPatch, helm: Helm) -> None:
    password = "s3cr/t:p@ss%x+y#z"  # URL-special characters must come back out of AIRFLOW_CONN_*
    manifests = helm.render("--set-string", f"mlflow.auth.admin.password={password}",
                            "--set", "mlflow.auth.admin.username=ml-platform")
    from airflow_modelopt.hooks.mlflow import MlflowHook

    _load_into_env(monkeypatch, manifests)
    tracking = MlflowHook().tracking_config(fallback_to_local=False)
    assert tracking.tracking_uri == IN_CLUSTER_URI
    assert tracking.secret_env == {"MLFLOW_TRACKING_USERNAME": "ml-platform", "MLFLOW_TRACKING_PASSWORD": password}
    assert manifests.secret_data(AUTH_SECRET)["password"] == password
    assert manifests.secret_data(STEP_CREDENTIALS)["MLFLOW_TRACKING_PASSWORD"] == password


def test_existing_admin_secret_is_used_by_the_server(helm: Helm) -> None:
    manifests = helm.render("--set", "mlflow.auth.existingSecret=mlflow-admin", "--set", "connection.create=false",
                            "--set", "connection.credentialsSecret=my-step-credentials")
    env = _env(manifests.container("Deployment", MLFLOW, "mlflow"))
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": "username"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": "password"}
    assert manifests.secret_data(AUTH_SECRET).keys() == {"flask-secret-key"}  # no second admin password
    assert not [s for s in manifests.all("Secret") if s["metadata"]["name"] in (STEP_CREDENTIALS, f"{RELEASE}-connection")]
    assert manifests.config()["AIRFLOW__MODELOPT__KUBERNETES_MLFLOW_SECRET"] == "my-step-credentials"


def test_auth_mode_none_runs_the_plain_server(helm: Helm) -> None:
    manifests = helm.render("--set", "mlflow.auth.mode=none")
    mlflow = manifests.container("Deployment", MLFLOW, "mlflow")
    assert "--app-name" not in mlflow["args"] and not any(k.startswith("MLFLOW_AUTH") for k in _env(mlflow))
    assert not [s for s in manifests.all("Secret") if s["metadata"]["name"] in (AUTH_SECRET, STEP_CREDENTIALS)]
    assert manifests.secret_data(f"{RELEASE}-connection") == {"AIRFLOW_CONN_MLFLOW_DEFAULT": IN_CLUSTER_URI}
    assert manifests.config()["AIRFLOW__MODELOPT__KUBERNETES_MLFLOW_SECRET"] == ""
    assert manifests.one("NetworkPolicy", MLFLOW)  # the fence it is allowed only with


# --- NetworkPolicy --------------------------------------------------------------------------

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _admits(policy: dict[str, Any], labels: dict[str, str], namespace: str, port: int) -> bool:
    """Whether a NetworkPolicy lets a pod with these labels, in this namespace, reach `port`."""
    for rule in policy["spec"].get("ingress") or []:
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            if "ipBlock" in peer:
                continue
            ns_selector = peer.get("namespaceSelector")
            in_namespace = (namespace == policy["metadata"]["namespace"] if ns_selector is None
                            else _selects(ns_selector, {"kubernetes.io/metadata.name": namespace}))
            if in_namespace and _selects(peer.get("podSelector") or {}, labels):
                return True
    return False


def _pod_labels(manifests: Manifests, kind: str, name: str) -> dict[str, str]:
    return manifests.one(kind, name)["spec"]["template"]["metadata"]["labels"]


def _airflow_pod(component: str, release: str = "airflow") -> dict[str, str]:
    """Labels Airflow's official chart puts on its pods."""
    return {"tier": "airflow", "component": component, "release": release}


@pytest.mark.parametrize("manifests_fixture", ["default_manifests", "external_manifests"])
def test_mlflow_admits_only_airflow_and_step_pods(manifests_fixture: str, request: pytest.FixtureRequest,
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from airflow_modelopt.hooks.mlflow import MlflowHook

    manifests: Manifests = request.getfixturevalue(manifests_fixture)
    policy = manifests.one("NetworkPolicy", MLFLOW)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    mlflow_pod = _pod_labels(manifests, "Deployment", MLFLOW)
    assert _selects(policy["spec"]["podSelector"], mlflow_pod)
    port = manifests.container("Deployment", MLFLOW, "mlflow")["ports"][0]["containerPort"]

    for component in ("scheduler", "worker", "triggerer", "api-server", "dag-processor"):
        assert _admits(policy, _airflow_pod(component), NAMESPACE, port), component
    # a real step pod, as the provider's Kubernetes launcher builds it from the rendered config
    _load_into_env(monkeypatch, manifests)
    step = _step_pod(tmp_path, MlflowHook().tracking_config(fallback_to_local=False))
    assert _admits(policy, step.metadata.labels, step.metadata.namespace, port)

    refused = [
        ({"app": "curl"}, NAMESPACE),  # anything else in the namespace
        (_airflow_pod("redis"), NAMESPACE), (_airflow_pod("statsd"), NAMESPACE),  # Airflow's helpers
        (_airflow_pod("worker", release="other"), NAMESPACE),  # another Airflow
        (_airflow_pod("worker"), "elsewhere"),  # the same labels in another namespace
        (step.metadata.labels, "elsewhere"),  # a pod dressed as a step outside the step namespace
        ({k: v for k, v in step.metadata.labels.items() if k != "airflow-modelopt/step"}, step.metadata.namespace),
    ]
    for labels, namespace in refused:
        assert not _admits(policy, labels, namespace, port), (labels, namespace)
    assert not _admits(policy, _airflow_pod("worker"), NAMESPACE, port + 1)  # only the server's port


def test_extra_ingress_is_added(external_manifests: Manifests, external_values: dict[str, Any]) -> None:
    policy = external_manifests.one("NetworkPolicy", MLFLOW)
    assert policy["spec"]["ingress"][1:] == external_values["networkPolicy"]["extraIngress"]
    assert _admits(policy, {"app": "ingress-nginx"}, "ingress-nginx", 5000)


def test_postgresql_admits_only_mlflow(default_manifests: Manifests) -> None:
    policy = default_manifests.one("NetworkPolicy", POSTGRESQL)
    assert _selects(policy["spec"]["podSelector"], _pod_labels(default_manifests, "StatefulSet", POSTGRESQL))
    assert not _selects(policy["spec"]["podSelector"], _pod_labels(default_manifests, "Deployment", MLFLOW))
    port = default_manifests.container("StatefulSet", POSTGRESQL, "postgresql")["ports"][0]["containerPort"]
    assert _admits(policy, _pod_labels(default_manifests, "Deployment", MLFLOW), NAMESPACE, port)
    for labels in (_airflow_pod("worker"), _airflow_pod("scheduler"), {"airflow-modelopt/step": "promote"}, {}):
        assert not _admits(policy, labels, NAMESPACE, port), labels


def test_proxy_mode_admits_only_the_proxy(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "proxy.yaml"
    values.write_text(yaml.safe_dump({
        "mlflow": {"auth": {"mode": "proxy"}},
        "connection": {"trackingUri": "https://mlflow.example.com"},
        "networkPolicy": {"proxyPeers": [{"podSelector": {"matchLabels": {"app": "oauth2-proxy"}}}]},
    }))
    manifests = helm.render("-f", str(values))
    policy = manifests.one("NetworkPolicy", MLFLOW)
    assert _admits(policy, {"app": "oauth2-proxy"}, NAMESPACE, 5000)
    assert not _admits(policy, _airflow_pod("worker"), NAMESPACE, 5000)  # nothing goes around the proxy
    assert not _admits(policy, {"airflow-modelopt/step": "promote"}, NAMESPACE, 5000)
    assert "--app-name" not in manifests.container("Deployment", MLFLOW, "mlflow")["args"]
    assert manifests.secret_data(f"{RELEASE}-connection") == {"AIRFLOW_CONN_MLFLOW_DEFAULT": "https://mlflow.example.com"}


def test_network_policies_can_be_left_out(helm: Helm) -> None:
    assert not helm.render("--set", "networkPolicy.enabled=false").all("NetworkPolicy")
