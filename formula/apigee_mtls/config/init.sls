{#- Consul agent configuration, all derived from the pillar by the planner:
    consul.json (agent, TLS), encrypt.json (gossip key: 0640, diff never shown, rendered from
    a template on the minion so the key is not in the rendered SLS),
    apigee-mtls-services.json (ingress services, the egress service, their sidecars). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
include:
  - apigee_mtls.install

apigee-mtls-config-agent-file-managed:
  file.serialize:
    - name: {{ c.config_dir }}/consul.json
    - serializer: json
    - dataset: {{ plan.consul_config | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - require:
      - file: apigee-mtls-install-config-dir-managed

apigee-mtls-config-encrypt-file-managed:
  file.managed:
    - name: {{ c.config_dir }}/encrypt.json
    - source: salt://apigee_mtls/files/encrypt.json.jinja
    - template: jinja
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - show_changes: False
    - require:
      - file: apigee-mtls-install-config-dir-managed

apigee-mtls-config-services-file-managed:
  file.serialize:
    - name: {{ c.config_dir }}/apigee-mtls-services.json
    - serializer: json
    - dataset: {{ {"services": plan.services} | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - require:
      - file: apigee-mtls-install-config-dir-managed
{%- endif %}
