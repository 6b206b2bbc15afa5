"""Real datastores for the lab (``make lab COMPONENTS=real``, ``labctl.py up --components
real``): ZooKeeper 3.8, PostgreSQL 15 and OpenLDAP from Debian 12 (lab/build-rootfs-real.sh)
run in place of the stand-ins on their nodes, configured the way Apigee configures them:
server lists and peer addresses by node IP.

* ZooKeeper (every ``zookeeper`` node): ``server.N=<node IP>:2888:3888`` in the topology's
  order, ``myid`` N, the client port 2181 on every address, the quorum ports on the node's IP
  (the address in the server list: the ingress sidecar's ``node_ip`` target), the four-letter
  words allowed, the admin server off (its 8080 is the management server's). JVM heap 256 MiB.
* PostgreSQL (``postgres`` nodes): the first is the primary, the second a streaming standby
  (:func:`setup_standby`, once the mesh is up: ``pg_basebackup`` through it). Apigee's
  ``listen_addresses='*'``; ``pg_hba.conf`` trusts ``127.0.0.1/32``: through the mesh every
  peer's connection arrives from the local ingress sidecar (README, "Real datastores"); and,
  as Apigee's set-up, the management servers' and Postgres nodes' IPs (used without the mesh).
* OpenLDAP (``openldap`` nodes): slapd on Apigee's port 10389 (``ldap://:10389/``), Debian's
  default database ``dc=nodomain``. Where the topology has two or more, they replicate each
  other as Apigee's do (multi-provider syncrepl, ``olcMirrorMode``), each consuming from the
  others' ``ldap://<node IP>:10389`` (:func:`ldap_replication_script`, once the mesh is up:
  the replication crosses it).

Cassandra, Qpid and the Edge Java services have no Debian package: the stand-ins stay.
Nothing here is run by the formula: these are the components it protects.
"""
#: real component -> the meshed ports the real program serves (the stand-in keeps the others)
REAL_PORTS = {"zookeeper": [2181, 2888, 3888], "postgres": [5432], "openldap": [10389]}

PG_VERSION = "15"
PG_DATA = f"/var/lib/postgresql/{PG_VERSION}/main"
PG_CONF = f"/etc/postgresql/{PG_VERSION}/main"
LDAP_PORT = 10389
LDAP_BASE = "dc=nodomain"

ZOO_CFG = """# apigee_mtls lab: a real ZooKeeper ensemble, server list by node IP (as Apigee's)
tickTime=2000
initLimit=10
syncLimit=5
dataDir=/var/lib/zookeeper
clientPort=2181
4lw.commands.whitelist=*
admin.enableServer=false
"""

#: Debian's layout: /etc/zookeeper/conf -> (alternatives) conf_example, holding zoo.cfg and
#: myid (/var/lib/zookeeper/myid links there); zkServer.sh reads conf/environment
ZK_CONF = "/etc/zookeeper/conf_example"

#: conf/environment (zkEnv.sh links to it): Debian's, with an SLF4J binding on the class path.
#: Debian's zookeeper.jar names only slf4j-api, so the server logs nothing (SLF4J's no-op
#: logger); slf4j-simple writes its INFO log to stderr, which systemd keeps in the journal
#: (``journalctl -u zookeeper``): elections, the leader's epoch, learners' connections.
ZK_ENVIRONMENT = """ZOOMAIN=org.apache.zookeeper.server.quorum.QuorumPeerMain
ZOOCFGDIR=/etc/zookeeper/conf
ZOOCFG=/etc/zookeeper/conf/zoo.cfg
ZOO_LOG_DIR=/var/log/zookeeper
ZOO_LOG4J_PROP=INFO,ROLLINGFILE
JMXLOCALONLY=true
JAVA_OPTS=""
JAVA=/usr/bin/java
CLASSPATH="/etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar"
SERVER_JVMFLAGS="$SERVER_JVMFLAGS -Dorg.slf4j.simpleLogger.showDateTime=true"
"""

ZK_UNIT = """[Unit]
Description=ZooKeeper (apigee_mtls lab: the real component)
After=network-online.target
[Service]
User=zookeeper
Environment=SERVER_JVMFLAGS=-Xmx256m
ExecStart=/usr/share/zookeeper/bin/zkServer.sh start-foreground
Restart=on-failure
RestartSec=2
[Install]
WantedBy=multi-user.target
"""

PG_LAB_CONF = """# apigee_mtls lab (Apigee's settings for a primary and its standby)
listen_addresses = '*'
wal_level = replica
max_wal_senders = 5
hot_standby = on
"""

PG_HBA = """# apigee_mtls lab. Through the mesh every peer's connection arrives from the local ingress
# sidecar: 127.0.0.1 stands for the management server, the routers' clients and the standby.
local   all             postgres                                peer
local   all             all                                     peer
host    all             all             127.0.0.1/32            trust
host    replication     all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
# Apigee's own entries, by peer address: used without the mesh (before it, after a clean);
# with it the lockdown refuses direct connections, so they match nothing
"""


def pg_hba(model):
    """pg_hba.conf of a Postgres node: the sidecar's loopback (:data:`PG_HBA`), then an entry
    per management server and Postgres node by IP, as Apigee's set-up writes them."""
    peers = [n for n in model["nodes"] if not n["retired"]
             and {"management-server", "postgres"} & set(n["components"])]
    return PG_HBA + "".join(f"host    {db:15} all             {n['ip'] + '/32':23} trust\n"
                            for n in peers for db in ("all", "replication"))

SLAPD_UNIT = f"""[Unit]
Description=OpenLDAP (apigee_mtls lab: the real component, Apigee's port {LDAP_PORT})
After=network-online.target
[Service]
User=openldap
Group=openldap
# /run/slapd holds the ldapi socket and the pid file (Debian's init script makes it)
RuntimeDirectory=slapd
ExecStart=/usr/sbin/slapd -d 0 -h "ldap://:{LDAP_PORT}/ ldapi:///" -F /etc/ldap/slapd.d
Restart=on-failure
RestartSec=2
[Install]
WantedBy=multi-user.target
"""


#: the lab's rootDN (Debian's default database) and its password: a lab secret for the
#: replication binds and the tests' writes, not the formula's
LDAP_ADMIN = f"cn=admin,{LDAP_BASE}"
LDAP_ADMIN_PASSWORD = "amtls-lab-ldap"

_LDAP_REPLICATION = """set -e
wait_ldapi() {{ for i in $(seq 1 60); do ldapsearch -Q -LLL -Y EXTERNAL -H ldapi:/// \\
  -b cn=config -s base dn >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }}
wait_ldapi
if ldapsearch -Q -LLL -Y EXTERNAL -H ldapi:/// -b "olcDatabase={{1}}mdb,cn=config" -s base \\
     olcSyncrepl | grep -q '^olcSyncrepl'; then echo already; exit 0; fi
{empty}wait_ldapi
pw=$(slappasswd -s '{password}')
ldapmodify -Q -Y EXTERNAL -H ldapi:/// <<LDIF
dn: cn=config
changetype: modify
replace: olcServerID
olcServerID: {sid}

dn: cn=module{{0}},cn=config
changetype: modify
add: olcModuleLoad
olcModuleLoad: syncprov

dn: olcOverlay=syncprov,olcDatabase={{1}}mdb,cn=config
changetype: add
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: syncprov

dn: olcDatabase={{1}}mdb,cn=config
changetype: modify
replace: olcRootPW
olcRootPW: $pw
-
add: olcSyncrepl
{consumers}-
add: olcMirrorMode
olcMirrorMode: TRUE
LDIF
echo configured
"""


def ldap_replication_script(model, node):
    """Shell run as root on the LDAP server ``node``: multi-provider syncrepl with every other
    LDAP server of ``model``, as Apigee sets up its two OpenLDAP servers: a server ID, the
    ``syncprov`` overlay, the rootDN's password, one ``olcSyncrepl`` per other server by its
    node IP on 10389 (through the mesh once it is up), ``olcMirrorMode``. Every server but the
    first starts from an empty database (Debian's install gives each its own base entry; the
    first's reaches the others by replication). Idempotent: prints ``already`` where syncrepl
    is set, else ``configured``."""
    ldap = real_nodes(model, "openldap")
    sid = [n["id"] for n in ldap].index(node["id"]) + 1
    consumers = "".join(
        f"olcSyncrepl: rid={i:03d} provider=ldap://{n['ip']}:{LDAP_PORT} bindmethod=simple "
        f'binddn="{LDAP_ADMIN}" credentials={LDAP_ADMIN_PASSWORD} searchbase="{LDAP_BASE}" '
        'type=refreshAndPersist retry="2 +" timeout=5\n'
        for i, n in enumerate(ldap, start=1) if n["id"] != node["id"])
    empty = "" if sid == 1 else ("systemctl stop slapd\n"
                                 "rm -f /var/lib/ldap/data.mdb /var/lib/ldap/lock.mdb\n"
                                 "systemctl start slapd\n")
    return _LDAP_REPLICATION.format(empty=empty, password=LDAP_ADMIN_PASSWORD, sid=sid,
                                    consumers=consumers)


def real_nodes(model, component):
    """The live nodes running ``component``, in the topology's order."""
    return [n for n in model["nodes"] if component in n["components"] and not n["retired"]]


def standin_ports(node):
    """``{component: [ports]}`` the stand-in must leave to the real programs on ``node``."""
    return {c: REAL_PORTS[c] for c in node["components"] if c in REAL_PORTS}


def zoo_cfg(model):
    """zoo.cfg of the ensemble: the common settings and ``server.N`` by node IP."""
    servers = "".join(f"server.{i}={n['ip']}:2888:3888\n"
                      for i, n in enumerate(real_nodes(model, "zookeeper"), start=1))
    return ZOO_CFG + servers


def write_node(node, model, put, link):
    """Write ``node``'s real-component configuration into its overlay before it boots.
    ``put(path, text, mode)`` writes a file, ``link(unit)`` enables a unit."""
    comps = node["components"]
    if "zookeeper" in comps:
        myid = [n["id"] for n in real_nodes(model, "zookeeper")].index(node["id"]) + 1
        put(f"{ZK_CONF}/zoo.cfg", zoo_cfg(model))
        put(f"{ZK_CONF}/myid", f"{myid}\n")
        put(f"{ZK_CONF}/environment", ZK_ENVIRONMENT)
        put("/etc/systemd/system/zookeeper.service", ZK_UNIT)
        link("zookeeper.service")
    if "postgres" in comps:
        put(f"{PG_CONF}/conf.d/apigee-lab.conf", PG_LAB_CONF)
        put(f"{PG_CONF}/pg_hba.conf", pg_hba(model))
        link("postgresql.service")
    if "openldap" in comps:
        put("/etc/systemd/system/slapd.service", SLAPD_UNIT)
        link("slapd.service")


def direct_connections(ss_text, ports, peer_ips):
    r"""Established connections into local ``ports`` from any of ``peer_ips``: opened
    directly, not through the mesh, which delivers them from the local ingress sidecar (the
    node's own IP or loopback). Only the accepting end tells: the connecting end of a meshed
    connection still shows the peer's address (the nat rule rewrites its packets, not its
    socket). ``ss_text`` is ``ss -Htn state established``; returns
    ``["<local> <remote>", ...]``.

    >>> direct_connections("0 0 10.77.0.14:10389 10.77.0.16:40012\n"
    ...                    "0 0 10.77.0.14:10389 127.0.0.1:51000\n", [10389], {"10.77.0.16"})
    ['10.77.0.14:10389 10.77.0.16:40012']
    """
    found = []
    for line in ss_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local, remote = parts[-2], parts[-1]
        lport, rip = local.rsplit(":", 1)[1], remote.rsplit(":", 1)[0]
        # a JVM listens on [::]: its IPv4 peers show as [::ffff:a.b.c.d]
        rip = rip.strip("[]").removeprefix("::ffff:")
        if rip in peer_ips and lport in {str(p) for p in ports}:
            found.append(f"{local} {remote}")
    return found


def direct_quorum_connections(ss_text, peer_ips):
    r"""Established connections into ZooKeeper's quorum ports (2888, 3888) from a peer's IP:
    opened directly, before the mesh (:func:`direct_connections`).

    >>> direct_quorum_connections(
    ...     "0 0 10.77.0.12:2888 10.77.0.13:40012\n0 0 10.77.0.12:2888 10.77.0.12:51000\n"
    ...     "0 0 10.77.0.12:51234 10.77.0.11:3888\n", {"10.77.0.11", "10.77.0.13"})
    ['10.77.0.12:2888 10.77.0.13:40012']
    """
    return direct_connections(ss_text, (2888, 3888), peer_ips)


def postgres_roles(model):
    """``(primary, standby)`` nodes: the first two Postgres nodes (standby ``None`` if one)."""
    pg = real_nodes(model, "postgres")
    return (pg[0] if pg else None), (pg[1] if len(pg) > 1 else None)


#: run on the primary as ``postgres``: ends the replication connections that did not arrive
#: through the local ingress sidecar (opened directly, in plaintext, before the mesh or while
#: it was cleaned away); the standby reconnects within ``wal_retrieve_retry_interval`` (5 s),
#: through the mesh since the lockdown refuses the direct way. Prints how many it ended.
END_DIRECT_REPLICATION = ("select count(pg_terminate_backend(pid)) from pg_stat_replication "
                          "where client_addr is distinct from '127.0.0.1'")


def standby_script(primary_ip):
    """Shell run on the standby node: replace its cluster by a base backup of the primary's,
    taken through the mesh (``-h <primary IP>``: the node's nat rules send it to its egress
    sidecar), ``-R`` writing ``primary_conninfo`` to the same address. Idempotent: a standby
    already streaming from that address is left alone."""
    return f"""set -e
if [ -e {PG_DATA}/standby.signal ] && grep -q "host={primary_ip} " \\
     {PG_DATA}/postgresql.auto.conf 2>/dev/null; then echo already; exit 0; fi
systemctl stop postgresql
rm -rf {PG_DATA}.new
for i in $(seq 1 60); do
  runuser -u postgres -- pg_basebackup -h {primary_ip} -p 5432 -U postgres \\
    -D {PG_DATA}.new -X stream -R -c fast && break
  rm -rf {PG_DATA}.new; sleep 2
done
[ -d {PG_DATA}.new ] || {{ echo "pg_basebackup from {primary_ip} failed" >&2; exit 1; }}
rm -rf {PG_DATA} && mv {PG_DATA}.new {PG_DATA}
systemctl start postgresql
echo created
"""
