{#- The Consul agent as a systemd unit. Agent config changes restart it; service definitions,
    the agent certificate and the CA bundle only need a reload (Consul 1.8 re-reads
    ca_file, cert_file and key_file on reload, hashicorp/consul#5419), which keeps the
    sidecars' connections. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
include:
  - apigee_mtls.install
  - apigee_mtls.tls
  - apigee_mtls.config

apigee-mtls-service-unit-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/consul.service
    - source: salt://apigee_mtls/files/consul.service.jinja
    - template: jinja
    - context:
        consul: {{ c | json }}
    - user: root
    - group: root
    - mode: "0644"

{#- how systemd stops the agent: a drop-in, not the unit, so that a change to it restarts no
    agent (agent_current restarts on a unit file change); systemd reads it at the next stop #}
apigee-mtls-service-stop-dropin-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/consul.service.d/apigee-mtls-stop.conf
    - source: salt://apigee_mtls/files/consul-stop.conf
    - makedirs: True
    - user: root
    - group: root
    - mode: "0644"

apigee-mtls-service-systemd-reloaded:
  cmd.run:
    - name: systemctl daemon-reload
    - onchanges:
      - file: apigee-mtls-service-stop-dropin-managed

apigee-mtls-service-running:
  service.running:
    - name: consul
    - enable: True
    - require:
      - apigee_mtls: apigee-mtls-tls-agent-cert-managed
      - file: apigee-mtls-install-data-dir-managed
      # encrypt.json seeds the keyring on the first start only; a later key change goes
      # through `consul keyring`, so it must not restart every agent at once
      - file: apigee-mtls-config-encrypt-file-managed
      # consul.json: its own state reloads or restarts a running agent as the change needs
      - apigee_mtls: apigee-mtls-config-agent-file-managed
      - file: apigee-mtls-service-unit-managed
      - cmd: apigee-mtls-service-systemd-reloaded
      - file: apigee-mtls-install-consul-binary-managed
{%- if plan.acl.enabled %}
    - watch:
      # the local master token must be known from the first start (reload needs it)
      - file: apigee-mtls-config-agent-master-file-managed
{%- endif %}

{#- A new binary (consul:install) or unit file restarts the agent without an outage: servers
    one at a time under a Consul lock after a health check, the leader last, then clients;
    new connections to the node's sidecars are held meanwhile; sidecars keep running. #}
apigee-mtls-service-current:
  apigee_mtls.agent_current:
    - name: consul
    - bin_path: {{ c.bin }}
    - unit_file: {{ params.systemd_unit_dir }}/consul.service
    - restart: {{ plan.restart | json }}
{%- if c.install.method == "binary" %}
    - binary_hash: {{ c.install.source_hash }}
{%- endif %}
    {#- with ACLs, after the node's token (apigee_mtls.acl: require_in) #}
    - require:
      - service: apigee-mtls-service-running

{#- `consul reload` returns once the agent has re-read its configuration (a SIGHUP would
    not wait): sidecars restarted right after it must see their new definitions. #}
apigee-mtls-service-reloaded:
  cmd.run:
    - name: {{ c.bin }} reload -http-addr=127.0.0.1:8500
{%- if plan.acl.enabled %}
    {#- reload needs agent:write: the agent's local master token, by file (never on a
        command line); it works without the servers #}
    - env:
      - CONSUL_HTTP_TOKEN_FILE: {{ plan.acl.agent_master_token_file }}
{%- endif %}
    - retry:
        attempts: 15
        interval: 2
    {#- also on new service definitions (apigee_mtls.mesh) and a new token (apigee_mtls.acl),
        through their onchanges_in: the includes stay one way #}
    - onchanges:
      # the certificate and the CA bundle are one state: a renewal or a CA rotation step
      # reloads once, an unchanged run not at all
      - apigee_mtls: apigee-mtls-tls-agent-cert-managed
    - require:
      - apigee_mtls: apigee-mtls-service-current
{%- endif %}
