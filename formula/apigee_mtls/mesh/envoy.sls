{#- The Envoy data plane (proxy:data_plane: envoy; docs/design-envoy.md): one Envoy
    per node serves every sidecar listener of the node (the same addresses and ports as the
    built-in proxies: registrations, checks and nat rules are unchanged). Its certificates
    come from the local agent (apigee_mtls_envoy.certificates_managed), its listeners and
    clusters from the plan (apigee_mtls_envoy.resources_managed); Envoy reloads both when they
    change, without a restart. Only a new binary, unit or bootstrap restarts it. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member and plan.envoy %}
{%- set c = plan.consul %}
{%- set e = plan.envoy %}
include:
  - apigee_mtls.service
  - apigee_mtls.mesh.envoy_certificates

apigee-mtls-mesh-envoy-archive-extracted:
  archive.extracted:
    - name: {{ e.install_dir }}
    - source: {{ e.source }}
    - source_hash: {{ e.source_hash }}
    - archive_format: zip
    - enforce_toplevel: False
    - user: root
    - group: root

apigee-mtls-mesh-envoy-dir-managed:
  file.directory:
    - name: {{ e.dir }}
    - user: {{ plan.proxy.user }}
    - group: {{ c.group }}
    - mode: "0750"

{#- the certificates' own SLS (the schedule runs it alone) needs the directory and the agent #}
extend:
  apigee-mtls-mesh-envoy-certificates-managed:
    apigee_mtls_envoy.certificates_managed:
      - require:
        - file: apigee-mtls-mesh-envoy-dir-managed
        - cmd: apigee-mtls-service-reloaded

{#- between applies, the minion's schedule rewrites the certificates Envoy reads from files: a
    leaf the agent renewed (Consul 1.8: 72 h TTL), the roots of a CA rotation #}
apigee-mtls-mesh-envoy-certificates-scheduled:
  schedule.present:
    - name: {{ e.schedule }}
    - function: state.sls
    - job_args:
      - apigee_mtls.mesh.envoy_certificates
    - minutes: {{ e.renew_minutes }}
    - splay: 60
    - maxrunning: 1
    - persist: True
    - require:
      - apigee_mtls_envoy: apigee-mtls-mesh-envoy-certificates-managed

apigee-mtls-mesh-envoy-resources-managed:
  apigee_mtls_envoy.resources_managed:
    - name: {{ e.dir }}
    - node_id: {{ e.node_id }}
    - token_file: {{ plan.acl.agent_token_file | default(None) | json }}
    - user: {{ plan.proxy.user }}
    - group: {{ c.group }}
    - certs_dir: {{ e.certs_dir }}
    - require:
      - apigee_mtls_envoy: apigee-mtls-mesh-envoy-certificates-managed

apigee-mtls-mesh-envoy-bootstrap-managed:
  apigee_mtls_envoy.bootstrap_managed:
    - name: {{ e.dir }}/bootstrap.json
    - node_id: {{ e.node_id }}
    - cluster: {{ e.identity }}
    - admin_port: {{ e.admin_port }}
    - user: {{ plan.proxy.user }}
    - group: {{ c.group }}
    - require:
      - file: apigee-mtls-mesh-envoy-dir-managed

apigee-mtls-mesh-envoy-unit-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/{{ e.unit }}.service
    - source: salt://apigee_mtls/files/apigee-mtls-envoy.service.jinja
    - template: jinja
    - context:
        envoy: {{ e | json }}
        user: {{ plan.proxy.user }}
        group: {{ c.group }}
    - user: root
    - group: root
    - mode: "0644"

{#- the built-in proxies hold the same ports: they stop before Envoy starts (a move from one
    data plane to the other is not yet without an outage) #}
{%- for svc in plan.proxies %}
apigee-mtls-mesh-proxy-{{ svc }}-dead:
  service.dead:
    - name: apigee-mtls-proxy@{{ svc }}
    - enable: False
    - require_in:
      - service: apigee-mtls-mesh-envoy-running
{%- endfor %}

apigee-mtls-mesh-envoy-running:
  service.running:
    - name: {{ e.unit }}
    - enable: True
    - require:
      - archive: apigee-mtls-mesh-envoy-archive-extracted
      - apigee_mtls_envoy: apigee-mtls-mesh-envoy-resources-managed
      - service: apigee-mtls-service-running
    - watch:
      - file: apigee-mtls-mesh-envoy-unit-managed
      - apigee_mtls_envoy: apigee-mtls-mesh-envoy-bootstrap-managed
      - archive: apigee-mtls-mesh-envoy-archive-extracted
{%- endif %}
