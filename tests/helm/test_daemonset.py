"""The DaemonSet's command lines are real ``meshmirror`` command lines.

Every flag and every MESHMIRROR_* variable the chart sets is looked up by exact
name in ``meshmirror.cli.build_parser()`` (argparse would otherwise accept a
renamed flag's old spelling as an abbreviation of the new one), then the whole
command line is parsed with the environment applied exactly as the CLI applies
it, so a renamed flag or a value the CLI cannot parse breaks these tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from meshmirror import cli, flags
from meshmirror.containerd import hostsconfig
from meshmirror.mirror.options import MirrorConfig, TagResolution
from tests.helm import chart
from tests.helm.cmdline import check_env_names, check_exact_flags, node_env, parse_container

FULLNAME = f"{chart.RELEASE}-meshmirror"
JOIN_DNS = f"{FULLNAME}-mesh.{chart.NAMESPACE}.svc.cluster.local"


def test_run_command_line_defaults(helm: Path) -> None:
    manifests = chart.render()
    args = parse_container(chart.container(manifests, "meshmirror"))
    assert args.command == "run"
    assert args.store == "containerd"
    assert args.join_dns == JOIN_DNS
    assert args.join is None
    assert args.node_name == "node-a"
    assert args.advertise_addr == "198.51.100.7"
    assert (args.registry_addr, args.mesh_addr, args.metrics_addr) == (
        ("", 5000), ("", 7946), ("", 9090))  # port-only: both families
    assert args.log_level == "info"
    assert args.resolve_tags is TagResolution.UPSTREAM_FIRST
    assert args.mirror_resolve_timeout == pytest.approx(0.1)
    assert args.mirror_first_byte_timeout == pytest.approx(0.5)
    assert args.mirror_resolve_retries == 3
    assert args.mirror_spool_limit == 4 << 30
    assert args.mirror_spool_dir == Path("/var/spool/meshmirror")
    assert args.summary_fp_rate == pytest.approx(0.01)
    assert args.mirrored_registries is None
    # run rewrites the node's hosts.toml entry at every start, as configure did.
    assert args.write_hosts_config is True
    assert args.mirror_targets == ["http://192.0.2.10:30022,http://192.0.2.10:30023"]
    # containerd reaches the hostPort from the node's IP: the reserved accept queue's.
    assert args.client_own_addrs == ("192.0.2.10",)
    assert args.containerd_registry_config_path == Path("/etc/containerd/certs.d")
    assert args.registry_filters is None
    # Gossip is encrypted by default, with the key the chart generates.
    assert args.gossip_key_file == "/etc/meshmirror/gossip/gossip-key"
    assert args.containerd_sock == "/run/containerd/containerd.sock"
    assert args.containerd_namespace == "k8s.io"
    assert args.containerd_content_path == "/var/lib/containerd/io.containerd.content.v1.content"
    assert args.containerd_config == "/etc/containerd/config.toml"


def test_run_command_line_custom_values(helm: Path) -> None:
    manifests = chart.render(("custom-registries.yaml",))
    args = parse_container(chart.container(manifests, "meshmirror"))
    assert args.log_level == "debug"
    assert flags.split_list(args.mirrored_registries) == [
        "https://docker.io", "ghcr.io", "http://registry.internal:5050"]
    # Each regex arrives whole, commas included: lists are flags, not one env value.
    assert args.registry_filters == ["^docker\\.io/library/.{1,3}:", ":latest$"]
    assert args.resolve_tags is TagResolution.OFF
    assert args.mirror_resolve_timeout == pytest.approx(0.05)
    assert args.mirror_resolve_retries == 5
    assert args.mirror_spool_limit == 6 << 30
    assert args.summary_fp_rate == pytest.approx(0.001)
    assert (args.registry_addr, args.mesh_addr, args.metrics_addr) == (
        ("", 5001), ("", 7947), ("", 9191))
    assert args.join == ["seed.example.internal:7947"]


def test_exact_name_checks_catch_what_argparse_abbreviation_hides(helm: Path) -> None:
    """A renamed flag would be caught even where argparse accepts its prefix, and a
    value the flag's type refuses fails the parse."""
    parser = cli.build_parser()
    run = chart.subparser(parser, "run")
    assert parser.parse_args(["run", "--join-d=x"]).join_dns == "x"  # argparse: abbreviation
    with pytest.raises(AssertionError, match="--join-d"):
        check_exact_flags(["run", "--join-d=x"], run, "test")
    with pytest.raises(AssertionError, match="MESHMIRROR_JOIN_DNS_NAME"):
        check_env_names({"MESHMIRROR_JOIN_DNS_NAME": "x"}, "run")
    bad = {"name": "meshmirror", "command": ["meshmirror"], "args": ["run"],
           "env": [{"name": "MESHMIRROR_RESOLVE_TAGS", "value": "maybe"}]}
    with pytest.raises(AssertionError, match="refuses"):
        parse_container(bad)


@pytest.mark.parametrize("value_files", [(), ("custom-registries.yaml",),
                                         ("encryption-off.yaml",), ("spool-off.yaml",)])
def test_env_names_are_unique(helm: Path, value_files: tuple[str, ...]) -> None:
    """A repeated name is accepted by the API server with only a warning, last one wins."""
    spec = chart.pod_spec(chart.render(value_files))
    for cont in [*spec["initContainers"], *spec["containers"]]:
        names = [e["name"] for e in cont.get("env", [])]
        assert len(names) == len(set(names)), f"{cont['name']}: {names}"


def test_extra_env_is_appended(helm: Path) -> None:
    main = chart.container(chart.render(("custom-registries.yaml",)), "meshmirror")
    assert main["env"][-1] == {"name": "TZ", "value": "UTC"}


def test_proxy_values_set_the_variables_containerd_reads(helm: Path) -> None:
    def proxy_env(sets: tuple[str, ...]) -> dict[str, str]:
        main = chart.container(chart.render(sets=sets), "meshmirror")
        return {e["name"]: e["value"] for e in main["env"] if "PROXY" in e["name"]}

    assert proxy_env(()) == {}
    assert proxy_env(("proxy.httpsProxy=http://10.0.0.9:3128",
                      "proxy.noProxy=.svc\\,10.0.0.0/8")) == {
        "HTTPS_PROXY": "http://10.0.0.9:3128", "NO_PROXY": ".svc,10.0.0.0/8"}
    assert proxy_env(("proxy.httpProxy=proxy:3128",)) == {"HTTP_PROXY": "proxy:3128"}


def test_downward_api_fields(helm: Path) -> None:
    main = chart.container(chart.render(), "meshmirror")
    init = chart.container(chart.render(), "configure", init=True)
    assert chart.field_env(main) == {"NODE_IP": "status.hostIP",
                                     "MESHMIRROR_NODE_NAME": "spec.nodeName",
                                     "MESHMIRROR_ADVERTISE_ADDR": "status.podIP"}
    assert chart.field_env(init) == {"NODE_IP": "status.hostIP"}


def test_configure_init_container(helm: Path) -> None:
    init = chart.container(chart.render(), "configure", init=True)
    args = parse_container(init)
    assert args.command == "configure"
    assert args.containerd_registry_config_path == Path("/etc/containerd/certs.d")
    # hostPort of this node first, then the NodePort Service reaching any node.
    assert hostsconfig.parse_targets(args.mirror_targets) == [
        "http://192.0.2.10:30022", "http://192.0.2.10:30023"]
    assert args.mirrored_registries is None
    assert args.resolve_tags is TagResolution.UPSTREAM_FIRST
    assert args.prepend_existing is False
    assert [r.directory for r in hostsconfig.parse_registries(args.mirrored_registries)] == [
        "_default"]
    assert {"name": "containerd-certs", "mountPath": "/etc/containerd/certs.d"} in init[
        "volumeMounts"]


def test_configure_init_container_custom(helm: Path) -> None:
    init = chart.container(chart.render(("custom-registries.yaml",)), "configure", init=True)
    args = parse_container(init)
    assert args.log_level == "debug"
    assert hostsconfig.parse_targets(args.mirror_targets) == [
        "http://192.0.2.10:31020", "http://192.0.2.10:31021", "http://mirror.example.internal:5000"]
    assert args.resolve_tags is TagResolution.OFF
    assert args.prepend_existing is True
    registries = hostsconfig.parse_registries(args.mirrored_registries)
    assert [r.directory for r in registries] == ["docker.io", "ghcr.io", "registry.internal:5050"]


def test_no_node_port_means_one_target(helm: Path) -> None:
    manifests = chart.render(("k3s-minimal.yaml",))
    args = parse_container(chart.container(manifests, "configure", init=True))
    assert hostsconfig.parse_targets(args.mirror_targets) == ["http://192.0.2.10:30022"]
    assert args.containerd_registry_config_path == Path(
        "/var/lib/rancher/k3s/agent/etc/containerd/certs.d")
    service = chart.one(manifests, "Service", f"{FULLNAME}-registry")
    assert service["spec"]["type"] == "ClusterIP"
    assert "nodePort" not in service["spec"]["ports"][0]


def test_init_and_main_container_write_the_same_hosts_config(helm: Path) -> None:
    """configure (once per pod) and run (at every start) agree on every hosts.toml setting."""
    for value_files in [(), ("custom-registries.yaml",), ("k3s-minimal.yaml",)]:
        manifests = chart.render(value_files)
        init = parse_container(chart.container(manifests, "configure", init=True))
        run = parse_container(chart.container(manifests, "meshmirror"))
        # The configs each command builds from its flags, as `configure` and `run` write them.
        assert cli.hosts_config(init, targets_required=True) == cli.hosts_config(
            run, targets_required=True), value_files
        for cont in chart.pod_spec(manifests)["containers"]:
            assert "lifecycle" not in cont, "no cleanup when a container stops"
            assert all("$(" not in v for v in node_env(cont).values()), node_env(cont)


def test_doctor_in_the_pod_sees_what_the_chart_configured(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kubectl exec ... -- meshmirror doctor` runs with the main container's env."""
    manifests = chart.render(("custom-registries.yaml",))
    main = chart.container(manifests, "meshmirror")
    for name in [n for n in os.environ if n.startswith("MESHMIRROR_")]:
        monkeypatch.delenv(name)
    for name, value in node_env(main).items():
        monkeypatch.setenv(name, value)
    args = cli.parse_args(["doctor"])
    hosts = cli.hosts_config(args, targets_required=False)
    assert [r.directory for r in hosts.registries] == [
        "docker.io", "ghcr.io", "registry.internal:5050"]
    assert hosts.targets == ("http://192.0.2.10:31020", "http://192.0.2.10:31021",
                             "http://mirror.example.internal:5000")
    assert args.registry_addr == ("", 5001)


def test_certs_are_mounted_writable_in_the_main_container(helm: Path) -> None:
    for value_files in [(), ("k3s-minimal.yaml",)]:
        main = chart.container(chart.render(value_files), "meshmirror")
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert not mounts["containerd-certs"].get("readOnly", False)


def _run_in_pod_like_env(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(argv[0])
    assert exe, f"{argv[0]} is not installed: pip install -e '.[dev]'"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHMIRROR_")}
    return subprocess.run([exe, *argv[1:]], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, check=False)


def test_init_then_uninstall_hook_round_trip_on_a_real_directory(
    helm: Path, tmp_path: Path
) -> None:
    """Run the rendered init container, then the post-delete hook's cleanup, for real,
    against a certs.d that already holds an operator's hosts.toml: configure adds both
    mirrors, run's start-up step keeps them, cleanup puts the original back byte for byte."""
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    original = b'server = "https://registry-1.docker.io"\n'
    (certs / "docker.io" / "hosts.toml").write_bytes(original)
    manifests = chart.render(sets=[f"meshmirror.containerdRegistryConfigPath={certs}",
                                   "meshmirror.mirroredRegistries={https://docker.io}"])
    init = chart.container(manifests, "configure", init=True)
    done = _run_in_pod_like_env(["meshmirror", *init["args"]], node_env(init))
    assert done.returncode == 0, done.stderr
    written = (certs / "docker.io" / "hosts.toml").read_text()
    assert 'host."http://192.0.2.10:30022"' in written
    assert 'host."http://192.0.2.10:30023"' in written
    assert written.index(":30022") < written.index(":30023")

    hook = chart.one(chart.hooks(manifests), "DaemonSet")["spec"]["template"]["spec"]
    (cleanup,) = hook["initContainers"]
    done = _run_in_pod_like_env([*cleanup["command"], *cleanup["args"]], node_env(cleanup))
    assert done.returncode == 0, done.stderr
    assert (certs / "docker.io" / "hosts.toml").read_bytes() == original


def test_host_path_mounts(helm: Path) -> None:
    spec = chart.pod_spec(chart.render())
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["containerd-sock"]["hostPath"] == {
        "path": "/run/containerd/containerd.sock", "type": "Socket"}
    assert volumes["containerd-content"]["hostPath"] == {
        "path": "/var/lib/containerd/io.containerd.content.v1.content", "type": "Directory"}
    assert volumes["containerd-certs"]["hostPath"] == {
        "path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}
    assert volumes["containerd-config"]["hostPath"] == {
        "path": "/etc/containerd/config.toml", "type": "File"}
    main = chart.container(chart.render(), "meshmirror")
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["containerd-sock"]["mountPath"] == "/run/containerd/containerd.sock"
    assert mounts["containerd-content"] == {
        "name": "containerd-content", "readOnly": True,
        "mountPath": "/var/lib/containerd/io.containerd.content.v1.content"}
    assert mounts["containerd-config"]["readOnly"] is True
    # Every mount names a declared volume, and every hostPath is mounted where the
    # CLI is told to look (same path inside and out).
    for cont in [*spec["initContainers"], *spec["containers"]]:
        for mount in cont["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "hostPath" in volume:
                assert mount["mountPath"] == volume["hostPath"]["path"]


def test_k3s_paths_and_no_config_mount(helm: Path) -> None:
    manifests = chart.render(("k3s-minimal.yaml",))
    spec = chart.pod_spec(manifests)
    assert "containerd-config" not in {v["name"] for v in spec["volumes"]}
    args = parse_container(chart.container(manifests, "meshmirror"))
    assert args.containerd_sock == "/run/k3s/containerd/containerd.sock"
    assert args.containerd_content_path == (
        "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content")
    assert "priorityClassName" not in spec
    assert spec["serviceAccountName"] == "default"
    assert not chart.of_kind(manifests, "ServiceAccount")


def test_ports(helm: Path) -> None:
    main = chart.container(chart.render(), "meshmirror")
    ports = {(p["name"], p["protocol"]): p for p in main["ports"]}
    assert ports[("registry", "TCP")] == {"name": "registry", "containerPort": 5000,
                                          "hostPort": 30022, "protocol": "TCP"}
    assert ports[("mesh-tcp", "TCP")]["containerPort"] == 7946
    assert ports[("mesh-udp", "UDP")]["containerPort"] == 7946
    assert ports[("metrics", "TCP")]["containerPort"] == 9090
    # Only the registry is published on the host; gossip goes pod to pod.
    assert [p["name"] for p in main["ports"] if "hostPort" in p] == ["registry"]


def test_probes(helm: Path) -> None:
    main = chart.container(chart.render(), "meshmirror")
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "registry"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "registry"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "registry"}
    # The startup probe must leave room for joining the mesh: at least a minute.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_services(helm: Path) -> None:
    manifests = chart.render()
    pod_labels = one_pod_labels(manifests)
    main = chart.container(manifests, "meshmirror")
    port_names = {p["name"] for p in main["ports"]}
    registry = chart.one(manifests, "Service", f"{FULLNAME}-registry")["spec"]
    assert registry["type"] == "NodePort"
    assert registry["ports"] == [{"name": "registry", "port": 5000, "targetPort": "registry",
                                  "protocol": "TCP", "nodePort": 30023}]
    mesh = chart.one(manifests, "Service", f"{FULLNAME}-mesh")["spec"]
    assert mesh["clusterIP"] == "None"
    assert mesh["publishNotReadyAddresses"] is True
    assert {(p["port"], p["protocol"]) for p in mesh["ports"]} == {(7946, "TCP"), (7946, "UDP")}
    metrics = chart.one(manifests, "Service", f"{FULLNAME}-metrics")["spec"]
    for spec in (registry, mesh, metrics):
        assert spec["selector"].items() <= pod_labels.items()
        for port in spec["ports"]:
            assert port["targetPort"] in port_names
    # --join-dns names the headless Service.
    assert JOIN_DNS.split(".")[0] == f"{FULLNAME}-mesh"


def one_pod_labels(manifests: list[chart.Manifest]) -> dict[str, str]:
    daemonset = chart.one(chart.installed(manifests), "DaemonSet")
    labels: dict[str, str] = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_the_zone_label_is_read_with_get_on_nodes_only_when_asked_for(helm: Path) -> None:
    manifests = chart.render()
    assert not chart.of_kind(manifests, "ClusterRole")
    assert "MESHMIRROR_ZONE_FROM_NODE_LABEL" not in chart.literal_env(
        chart.container(manifests, "meshmirror"))
    label = "topology.kubernetes.io/zone"
    manifests = chart.render(sets=[f"meshmirror.zoneFromNodeLabel={label}"])
    args = parse_container(chart.container(manifests, "meshmirror"))
    assert args.zone_from_node_label == label
    assert chart.pod_spec(manifests)["automountServiceAccountToken"] is True
    role = chart.one(manifests, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = chart.one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = chart.one(manifests, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": account["metadata"]["name"],
                                    "namespace": chart.NAMESPACE}]


def test_scheduling_and_security_defaults(helm: Path) -> None:
    manifests = chart.render()
    spec = chart.pod_spec(manifests)
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["automountServiceAccountToken"] is False
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    for cont in [*spec["initContainers"], *spec["containers"]]:
        ctx = cont["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
    strategy = chart.one(chart.installed(manifests), "DaemonSet")["spec"]["updateStrategy"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0


def test_image_tag_and_digest(helm: Path) -> None:
    assert chart.container(chart.render(), "meshmirror")["image"] == (
        "ghcr.io/meshmirror/meshmirror:0.1.0")
    tagged = chart.render(sets=["image.repository=example.internal/mm", "image.tag=1.2.3"])
    assert chart.container(tagged, "meshmirror")["image"] == "example.internal/mm:1.2.3"
    pinned = chart.render(("custom-registries.yaml",))
    for cont in (chart.container(pinned, "meshmirror"),
                 chart.container(pinned, "configure", init=True)):
        assert cont["image"] == ("registry.example.internal/meshmirror@sha256:"
                                 "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")


def test_ipv6_nodes_need_no_setting(helm: Path) -> None:
    """The default mirrorHost, $(NODE_IP), expands to a bare IPv6 address on an IPv6
    node; meshmirror brackets it."""
    manifests = chart.render()
    for cont in (chart.container(manifests, "configure", init=True),
                 chart.container(manifests, "meshmirror")):
        args = parse_container(cont, node={"status.hostIP": "2001:db8::10"})
        assert hostsconfig.parse_targets(args.mirror_targets) == [
            "http://[2001:db8::10]:30022", "http://[2001:db8::10]:30023"]


def test_listen_on_pod_ip(helm: Path) -> None:
    manifests = chart.render(sets=["meshmirror.listenOnPodIP=true"])
    for pod_ip in ("198.51.100.7", "2001:db8::7"):
        args = parse_container(chart.container(manifests, "meshmirror"),
                               node={"status.podIP": pod_ip})
        assert (args.registry_addr, args.mesh_addr, args.metrics_addr) == (
            (pod_ip, 5000), (pod_ip, 7946), (pod_ip, 9090))


def test_memory_limit_is_spegels_and_holds_the_mirrors_bounds(helm: Path) -> None:
    """128Mi by default (measured: a 200-pull burst peaks at 80 MiB), and never less than
    the peer-chunk budget the node is told it may hold, with room for the rest."""
    cont = chart.container(chart.render(), "meshmirror")
    limit = chart.quantity_value(cont["resources"]["limits"]["memory"])
    assert limit == 128 * 2**20
    budget = MirrorConfig().memory_limit
    assert limit >= budget + 96 * 2**20, "the process itself takes about 70 MiB at rest"
