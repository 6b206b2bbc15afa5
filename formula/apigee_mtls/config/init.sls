{#- Consul agent configuration, all derived from the pillar by the planner:
    consul.json (agent, TLS), encrypt.json (gossip key: 0640, diff never shown, rendered from
    a template on the minion so the key is not in the rendered SLS) and, with ACLs, the
    agent's local master token and acl-agent-master.json (in place before the agent's first
    start). The service definitions are apigee_mtls.mesh's (they carry the node's token). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
include:
  - apigee_mtls.install

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
      - file: apigee-mtls-config-agent-master-file-managed
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

{%- if plan.acl.enabled %}
{%-   set a = plan.acl %}
{%-   set shared = plan.proxy.user != c.user %}

apigee-mtls-config-acl-dir-managed:
  file.directory:
    - name: {{ a.dir }}
    - user: {{ c.user }}
    - group: {{ c.group }}
    - mode: "{{ '0750' if shared else '0700' }}"
    - require:
      - file: apigee-mtls-install-config-dir-managed
      - user: apigee-mtls-install-user-present

{#- the agent's local master token: authorizes `consul reload` on this agent without the
    servers (a new node that peers do not admit yet). In place before the agent's first start. #}
apigee-mtls-config-agent-master-token-managed:
  apigee_mtls.local_token_managed:
    - name: {{ a.agent_master_token_file }}
    - user: {{ c.user }}
    - group: {{ c.group }}
    - require:
      - file: apigee-mtls-config-acl-dir-managed

apigee-mtls-config-agent-master-file-managed:
  file.managed:
    - name: {{ a.agent_master_config }}
    - source: salt://apigee_mtls/files/acl-tokens.json.jinja
    - template: jinja
    - context:
        tokens: {{ {"agent_master": a.agent_master_token_file} | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - show_changes: False
    - require:
      - apigee_mtls: apigee-mtls-config-agent-master-token-managed
{%- endif %}
{%- endif %}
