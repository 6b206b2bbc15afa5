{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- set c = plan.get("consul") or {"bin": "/usr/local/bin/consul", "config_dir": "/etc/consul.d", "data_dir": "/var/lib/consul", "user": "consul", "group": "consul", "keep_user": False, "install": {"method": "binary"}, "version": "1.8.7"} %}
include:
  - apigee_mtls.service.clean

{#- A client about to lose its data dir, hence its Consul node ID, leaves the cluster first:
    the servers deregister it, and an agent installed again later registers under its new
    ID. Without the leave, Consul 1.8 refuses the new ID while the old entry still looks
    healthy ("Node name ... is reserved"): the catalog then keeps that node's old health
    states and its upstreams fail elsewhere. A server keeps its raft membership (a lone
    server's reinstall is a raft operation, README "Day-2 operations"). #}
{%- if plan.get("member") and not plan.get("is_server") and plan.get("consul_config") %}
apigee-mtls-install-agent-left:
  cmd.run:
    - name: {{ c.bin }} leave -http-addr=127.0.0.1:8500
{%-   if plan.acl.enabled %}
    - env:
      - CONSUL_HTTP_TOKEN_FILE: {{ plan.acl.agent_master_token_file }}
{%-   endif %}
    - onlyif: systemctl is-active --quiet consul
    - timeout: 60
    - require:
      - sls: apigee_mtls.mesh.clean
    - require_in:
      - service: apigee-mtls-service-dead
{%- endif %}

{%- if c.install.method == "pkg" %}
apigee-mtls-install-consul-binary-absent:
  pkg.removed:
    - name: {{ c.install.name }}
    - require:
      - sls: apigee_mtls.service.clean
{%- else %}
apigee-mtls-install-consul-binary-absent:
  file.absent:
    - name: {{ c.bin }}
    - require:
      - sls: apigee_mtls.service.clean

apigee-mtls-install-consul-archive-absent:
  file.absent:
    - name: /opt/consul-{{ c.version }}
    - require:
      - sls: apigee_mtls.service.clean
{%- endif %}

{%- for d in [c.config_dir, c.data_dir, params.state_dir] %}
apigee-mtls-install-dir-absent-{{ loop.index }}:
  file.absent:
    - name: {{ d }}
    - require:
      - sls: apigee_mtls.service.clean
{%- endfor %}

{%- if not c.keep_user %}
apigee-mtls-install-user-absent:
  user.absent:
    - name: {{ c.user }}
    - require:
      - sls: apigee_mtls.service.clean

apigee-mtls-install-group-absent:
  group.absent:
    - name: {{ c.group }}
    - require:
      - sls: apigee_mtls.service.clean
      - user: apigee-mtls-install-user-absent
{%- endif %}
