{#- Consul agent configuration, all derived from the pillar by the planner:
    consul.json (agent, TLS), encrypt.json (gossip key: 0640, diff never shown, rendered from
    a template on the minion so the key is not in the rendered SLS),
    apigee-mtls-services.json (ingress services, the egress service, their sidecars; with
    ACLs each carries the node's token, so it is rendered on the minion like encrypt.json,
    after the token is there, and its diff is not shown). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
include:
  - apigee_mtls.install
{%- if plan.acl.enabled %}
  - apigee_mtls.acl
{%- endif %}

{#- a change of keys Consul reloads (log level, TLS settings) reloads the running agent, which
    keeps its PID and connections; keys read at start wait for the next start; anything else
    marks it for a restart, which apigee-mtls-service-current does without an outage
    (apigee_mtls.agent_config_managed; the planner's agent_config_action decides) #}
apigee-mtls-config-agent-file-managed:
  apigee_mtls.agent_config_managed:
    - name: {{ c.config_dir }}/consul.json
    - config: {{ plan.consul_config | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - bin_path: {{ c.bin }}
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.agent_master_token_file }}
{%- endif %}
    - require:
      - file: apigee-mtls-install-config-dir-managed
{%- if plan.acl.enabled %}
      - file: apigee-mtls-acl-agent-master-file-managed
{%- endif %}

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
  file.managed:
    - name: {{ c.config_dir }}/apigee-mtls-services.json
    - source: salt://apigee_mtls/files/services.json.jinja
    - template: jinja
    - context:
        services: {{ plan.services | json }}
        token_file: {{ plan.acl.agent_token_file | default(None) | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - show_changes: False
    - require:
      - file: apigee-mtls-install-config-dir-managed
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-agent-token-managed
{%- endif %}
{%- endif %}
