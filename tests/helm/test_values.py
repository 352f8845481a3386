"""values.schema.json refuses bad values with a message naming the value, and the
optional parts (gossip encryption, ServiceMonitor) render what they promise."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from meshmirror.containerd import hostsconfig
from tests.helm import chart
from tests.helm.cmdline import parse_container

FULLNAME = f"{chart.RELEASE}-meshmirror"

# (--set or --set-string arguments, JSON pointer helm must name, words of the reason)
INVALID = [
    (["--set", "service.registry.port=abc"], "/service/registry/port", "got string, want integer"),
    (["--set-string", "service.registry.hostPort=30020"], "/service/registry/hostPort",
     "want integer"),
    (["--set", "service.mesh.port=70000"], "/service/mesh/port",
     "maximum: got 70,000, want 65,535"),
    (["--set", "service.metrics.port=0"], "/service/metrics/port", "minimum: got 0, want 1"),
    (["--set", "service.registry.nodePort=-1"], "/service/registry/nodePort",
     "minimum: got -1, want 0"),
    (["--set", "meshmirror.logLevel=verbose"], "/meshmirror/logLevel",
     "'verbose' does not match pattern"),
    (["--set", "meshmirror.resolveTags=maybe"], "/meshmirror/resolveTags", "want boolean"),
    (["--set", "meshmirror.rolloutFanout=-1"], "/meshmirror/rolloutFanout", "minimum"),
    (["--set", "meshmirror.outageVouches=sometimes"], "/meshmirror/outageVouches",
     "value must be one of"),
    (["--set", "meshmirror.mirrorResolveTimeout=0"], "/meshmirror/mirrorResolveTimeout",
     "exclusiveMinimum"),
    (["--set-string", "meshmirror.mirrorResolveTimeout=0.0"], "/meshmirror/mirrorResolveTimeout",
     "'0.0' does not match pattern"),
    (["--set", "meshmirror.mirrorResolveTimeout=soon"], "/meshmirror/mirrorResolveTimeout",
     "'soon' does not match pattern"),
    (["--set-json", "meshmirror.summaryFpRate=1.5"], "/meshmirror/summaryFpRate",
     "exclusiveMaximum"),
    (["--set", "meshmirror.mirrorSpoolLimit=lots"], "/meshmirror/mirrorSpoolLimit",
     "'lots' does not match pattern"),
    # Mega to parse_size, milli to Kubernetes: refused rather than guessed.
    (["--set", "meshmirror.mirrorSpoolLimit=512m"], "/meshmirror/mirrorSpoolLimit",
     "'512m' does not match pattern"),
    (["--set", "meshmirror.mirrorSpoolLimit=4 GiB"], "/meshmirror/mirrorSpoolLimit",
     "'4 GiB' does not match pattern"),
    (["--set", "meshmirror.mirrorSpoolLimit=1000000Ti"], "/meshmirror/mirrorSpoolLimit",
     "'1000000Ti' does not match pattern"),
    (["--set", "meshmirror.mirrorSpoolLimit=-1"], "/meshmirror/mirrorSpoolLimit",
     "minimum: got -1, want 0"),
    (["--set-json", "meshmirror.mirrorSpoolLimit=1.5"], "/meshmirror/mirrorSpoolLimit",
     "got number, want integer or string"),
    (["--set", "meshmirror.mirrorSpoolLimit=true"], "/meshmirror/mirrorSpoolLimit",
     "got boolean, want integer or string"),
    (["--set", "meshmirror.summaryFpRate=1.5"], "/meshmirror/summaryFpRate",
     "'1.5' does not match pattern"),
    (["--set", "meshmirror.zoneFromNodeLabel=my zone"], "/meshmirror/zoneFromNodeLabel",
     "'my zone' does not match pattern"),
    (["--set", "meshmirror.mirroredRegistries={docker.io/library}"],
     "/meshmirror/mirroredRegistries/0",
     "does not match pattern"),
    (["--set", "meshmirror.mirroredRegistries={ghcr.io,ghcr.io}"], "/meshmirror/mirroredRegistries",
     "items at 0 and 1 are equal"),
    (["--set", "meshmirror.additionalMirrorTargets={10.0.0.1:5000}"],
     "/meshmirror/additionalMirrorTargets/0",
     "does not match pattern"),
    (["--set", "meshmirror.containerdSock=run/containerd.sock"], "/meshmirror/containerdSock",
     "does not match pattern"),
    (["--set", "service.registry.prot=5000"], "/service/registry", "'prot' not allowed"),
    (["--set", "mirrorRegistries={ghcr.io}"], "", "'mirrorRegistries' not allowed"),
    (["--set", "updateStrategy.rollingUpdate.maxSurge=1"], "/updateStrategy/rollingUpdate/maxSurge",
     "value must be one of"),
    (["--set", "meshmirror.logLevel=WARNINGS"], "/meshmirror/logLevel",
     "'WARNINGS' does not match pattern"),
    (["--set", "meshmirror.mirrorResolveTimeout=20 ms"], "/meshmirror/mirrorResolveTimeout",
     "'20 ms' does not match pattern"),
    (["--set", "meshmirror.mirrorFirstByteTimeout=0s"], "/meshmirror/mirrorFirstByteTimeout",
     "'0s' does not match pattern"),
    (["--set", "meshmirror.clientSendTimeout=0"], "/meshmirror/clientSendTimeout",
     "exclusiveMinimum"),
    (["--set", "meshmirror.clientMaxConnections=0"], "/meshmirror/clientMaxConnections",
     "minimum: got 0, want 1"),
    (["--set", "gossip.enabled=maybe"], "/gossip/enabled", "want boolean"),
    (["--set", "livenessProbe.enabled=yes"], "/livenessProbe/enabled", "want boolean"),
    (["--set", "cleanup.onStop=true"], "/cleanup", "'onStop' not allowed"),
    (["--set", "cleanup.onUninstall=sometimes"], "/cleanup/onUninstall", "want boolean"),
    (["--set", "cleanup.timeoutSeconds=1"], "/cleanup/timeoutSeconds", "minimum: got 1, want 10"),
    (["--set", "meshmirror.listenOnPodIP=1"], "/meshmirror/listenOnPodIP", "want boolean"),
    (["--set", "image.digest=latest"], "/image/digest", "does not match pattern"),
    (["--set", "gossip.secretKey=a/b"], "/gossip/secretKey",
     "does not match pattern"),
    (["--set", "serviceMonitor.interval=often"], "/serviceMonitor/interval",
     "does not match pattern"),
    (["--set", "meshmirror.containerdMirrorAdd=no"], "/meshmirror/containerdMirrorAdd",
     "want boolean"),
    (["--set", "networkPolicy.nodeCIDRs={10.0.0.0}"], "/networkPolicy/nodeCIDRs/0",
     "does not match pattern"),
    (["--set", "networkPolicy.metricsFrom={prometheus}"], "/networkPolicy/metricsFrom/0",
     "want object"),
    (["--set", "networkPolicy.enable=true"], "/networkPolicy", "'enable' not allowed"),
    (["--set", "commonLabels.bad key=x"], "", "'bad key' does not match pattern"),
    # the chart's own labels: a selector label overridden leaves the DaemonSet's
    # selector matching none of its pods (and the Services and NetworkPolicy too)
    (["--set", "commonLabels.app\\.kubernetes\\.io/name=evil"], "",
     "invalid propertyName 'app.kubernetes.io/name'"),
    (["--set", "commonLabels.helm\\.sh/chart=x"], "", "invalid propertyName 'helm.sh/chart'"),
    (["--set", "podLabels.app\\.kubernetes\\.io/instance=evil"], "",
     "invalid propertyName 'app.kubernetes.io/instance'"),
    (["--set", "grafanaDashboard.label=-x"], "/grafanaDashboard/label",
     "does not match pattern"),
]


@pytest.mark.parametrize(("args", "pointer", "reason"), INVALID,
                         ids=[" ".join(a) for a, _, _ in INVALID])
def test_schema_rejects_invalid_values(
    helm: Path, args: list[str], pointer: str, reason: str
) -> None:
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART), *args])
    assert result.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert f"at '{pointer}'" in result.stderr, result.stderr
    assert reason in result.stderr, result.stderr


def test_decimals_given_with_set_reach_the_cli(helm: Path) -> None:
    """`helm --set x=0.05` passes a string, not a number; the schema takes both."""
    manifests = chart.render(sets=["meshmirror.mirrorResolveTimeout=0.05",
                                   "meshmirror.summaryFpRate=.001"])
    args = parse_container(chart.container(manifests, "meshmirror"))
    assert args.mirror_resolve_timeout == pytest.approx(0.05)
    assert args.summary_fp_rate == pytest.approx(0.001)


def test_schema_accepts_every_registry_form_configure_accepts(helm: Path) -> None:
    """The schema's pattern and configure's parser agree on the usual spellings."""
    forms = ["https://docker.io", "http://127.0.0.1:5050", "ghcr.io", "registry.internal:5050",
             "_default"]
    for form in forms:
        hostsconfig.parse_registry(form)
    chart.render(sets=["meshmirror.mirroredRegistries={" + ",".join(forms) + "}"])


def test_schema_covers_every_default_value() -> None:
    """Every key in values.yaml is declared, so additionalProperties=false guards them all."""
    import yaml

    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())

    def walk(value: object, node: dict[str, object], path: str) -> None:
        if not isinstance(value, dict) or node.get("additionalProperties") is not False:
            return
        props = node["properties"]
        assert isinstance(props, dict)
        for key, sub in value.items():
            assert key in props, f"{path}/{key} is not in values.schema.json"
            walk(sub, props[key], f"{path}/{key}")

    walk(values, schema, "")


def test_encryption_with_existing_secret(helm: Path) -> None:
    manifests = chart.render(("encryption-existing-secret.yaml",))
    assert not chart.of_kind(manifests, "Secret")
    spec = chart.pod_spec(manifests)
    volume = {v["name"]: v for v in spec["volumes"]}["gossip-key"]
    assert volume["secret"]["secretName"] == "gossip-keys"
    assert volume["secret"]["items"] == [{"key": "primary", "path": "primary"}]
    assert volume["secret"]["defaultMode"] == 0o400
    main = chart.container(manifests, "meshmirror")
    mount = {m["name"]: m for m in main["volumeMounts"]}["gossip-key"]
    assert mount["readOnly"] is True
    key_file = chart.literal_env(main)["MESHMIRROR_GOSSIP_KEY_FILE"]
    assert key_file == f"{mount['mountPath']}/primary"


def test_encryption_generates_a_usable_key_by_default(helm: Path) -> None:
    manifests = chart.render()
    secret = chart.one(manifests, "Secret", f"{FULLNAME}-gossip")
    file_content = base64.b64decode(secret["data"]["gossip-key"])
    # The mounted file holds base64 of a 32-byte key, as `serf keygen` prints it.
    assert len(base64.b64decode(file_content, validate=True)) == 32
    volume = {v["name"]: v for v in chart.pod_spec(manifests)["volumes"]}["gossip-key"]
    assert volume["secret"]["secretName"] == f"{FULLNAME}-gossip"
    main = chart.container(manifests, "meshmirror")
    assert chart.literal_env(main)["MESHMIRROR_GOSSIP_KEY_FILE"] == (
        "/etc/meshmirror/gossip/gossip-key")
    # Offline rendering cannot look the Secret up, so each render draws a new key:
    # the caveat values.yaml documents.
    again = chart.one(chart.render(), "Secret")
    assert again["data"] != secret["data"]


def test_gitops_key_renders_byte_identical_secrets(helm: Path) -> None:
    # The documented GitOps values (docs/faq.md): two offline renders, as Argo CD
    # makes on every sync, give the same Secret to the byte.
    first, second = (chart.template_text(("gossip-key-gitops.yaml",)) for _ in range(2))
    secrets = [[doc for doc in text.split("\n---\n") if "kind: Secret" in doc]
               for text in (first, second)]
    assert len(secrets[0]) == 1 and secrets[0] == secrets[1]
    secret = chart.one(chart.render(("gossip-key-gitops.yaml",)), "Secret")
    assert base64.b64decode(secret["data"]["gossip-key"]).decode() == (
        "bWVzaG1pcnJvci1naXRvcHMta2V5LWZvci10ZXN0cyE=")
    # existingSecret: the chart renders no Secret at all, so nothing can change.
    assert not chart.of_kind(chart.render(("encryption-existing-secret.yaml",)), "Secret")


def test_a_gossip_key_beside_an_existing_secret_is_refused(helm: Path) -> None:
    # Either would be used alone; together the key would be silently ignored, and a
    # GitOps repository holding it would not hold the key the mesh runs with.
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--set", "gossip.key=bWVzaG1pcnJvci1naXRvcHMta2V5LWZvci10ZXN0cyE=",
                             "--set", "gossip.existingSecret=mine"])
    assert result.returncode != 0
    assert "gossip.key and gossip.existingSecret" in result.stderr, result.stderr


def test_a_gossip_key_of_the_wrong_size_is_refused(helm: Path) -> None:
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--set", "gossip.key=c2hvcnQ="])
    assert result.returncode != 0 and "/gossip/key" in result.stderr


def test_encryption_can_be_turned_off(helm: Path) -> None:
    manifests = chart.render(("encryption-off.yaml",))
    assert not chart.of_kind(manifests, "Secret")
    main = chart.container(manifests, "meshmirror")
    assert "MESHMIRROR_GOSSIP_KEY_FILE" not in chart.literal_env(main)
    assert "gossip-key" not in {v["name"] for v in chart.pod_spec(manifests)["volumes"]}


def test_service_monitor(helm: Path) -> None:
    assert not chart.of_kind(chart.render(), "ServiceMonitor")
    manifests = chart.render(("servicemonitor.yaml",))
    monitor = chart.one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selected = [s for s in chart.of_kind(manifests, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [f"{FULLNAME}-metrics"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [chart.NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert endpoint["relabelings"][0]["targetLabel"] == "node"


def test_notes_render_for_every_mode(helm: Path) -> None:
    for value_files in [(), ("k3s-minimal.yaml",)]:
        result = chart.run_helm(["install", chart.RELEASE, str(chart.CHART), "--dry-run=client",
                                 "--namespace", chart.NAMESPACE,
                                 *chart.value_args(value_files)])
        assert result.returncode == 0, result.stderr
        notes = result.stdout.split("NOTES:", 1)[1]
        assert "meshmirror doctor" in notes
        if value_files:
            assert "cleanup.onUninstall is false" in notes
            assert "existingSecret" in notes
        else:
            assert "post-delete hook runs `meshmirror cleanup` on every node" in notes
            assert ":30023" in notes


def test_missing_helm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr(chart, "HELM", tmp_path / "no-helm")
    with pytest.raises(chart.HelmMissing, match="run `bash scripts/bootstrap`"):
        chart.helm_binary()


@pytest.mark.parametrize("duration", ["20ms", "1.5s", "1m30s", "500us", "0.25", "2"])
def test_go_durations_reach_the_flags_as_written(helm: Path, duration: str) -> None:
    """Spegel writes mirrorResolveTimeout as a Go duration; the schema takes it and
    the chart passes it on unchanged (the CLI reads both forms)."""
    manifests = chart.render(sets=[f"meshmirror.mirrorResolveTimeout={duration}",
                                   f"meshmirror.mirrorFirstByteTimeout={duration}"])
    env = chart.literal_env(chart.container(manifests, "meshmirror"))
    assert env["MESHMIRROR_MIRROR_RESOLVE_TIMEOUT"] == duration
    assert env["MESHMIRROR_MIRROR_FIRST_BYTE_TIMEOUT"] == duration


def test_client_bounds_reach_the_flags(helm: Path) -> None:
    manifests = chart.render(sets=["meshmirror.clientSendTimeout=1m",
                                   "meshmirror.clientMaxConnections=512"])
    env = chart.literal_env(chart.container(manifests, "meshmirror"))
    assert env["MESHMIRROR_CLIENT_SEND_TIMEOUT"] == "1m"
    assert env["MESHMIRROR_CLIENT_MAX_CONNECTIONS"] == "512"


@pytest.mark.parametrize(("given", "passed"), [
    ("INFO", "info"), ("Debug", "debug"), ("WARN", "warning"), ("warning", "warning"),
    ("ERROR", "error"),
])
def test_log_level_in_any_case(helm: Path, given: str, passed: str) -> None:
    manifests = chart.render(sets=[f"meshmirror.logLevel={given}"])
    for cont in (chart.container(manifests, "meshmirror"),
                 chart.container(manifests, "configure", init=True)):
        assert chart.literal_env(cont)["MESHMIRROR_LOG_LEVEL"] == passed
        assert parse_container(cont).log_level == passed


def test_spegel_style_values_render(helm: Path) -> None:
    manifests = chart.render(("spegel-style.yaml",))
    env = chart.literal_env(chart.container(manifests, "meshmirror"))
    assert env["MESHMIRROR_LOG_LEVEL"] == "warning"
    assert env["MESHMIRROR_MIRROR_RESOLVE_TIMEOUT"] == "20ms"


def test_liveness_probe_is_optional(helm: Path) -> None:
    assert "livenessProbe" in chart.container(chart.render(), "meshmirror")
    main = chart.container(chart.render(("custom-registries.yaml",)), "meshmirror")
    assert "livenessProbe" not in main
    assert {"startupProbe", "readinessProbe"} <= set(main)


def test_default_ports_leave_spegels_free(helm: Path) -> None:
    """Spegel's chart uses 30020 (hostPort, later its NodePort) and 30021 (NodePort)."""
    manifests = chart.render()
    host_ports = {p["hostPort"] for p in chart.container(manifests, "meshmirror")["ports"]
                  if "hostPort" in p}
    node_ports = {p["nodePort"] for s in chart.of_kind(manifests, "Service")
                  for p in s["spec"]["ports"] if "nodePort" in p}
    assert host_ports == {30022}
    assert node_ports == {30023}
    assert not (host_ports | node_ports) & {30020, 30021}
