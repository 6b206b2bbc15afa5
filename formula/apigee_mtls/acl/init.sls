{#- Consul ACLs, default deny (consul.json holds acl.enabled and the policies; tokens never
    appear in the rendered SLS). The signer bootstraps the ACL system once and keeps the
    management token (0600, owned by the service user) there and nowhere else; it also
    deletes the tokens of nodes that left the pillar. Every node asks the signer for its own
    token (through the master's reactor, answered sealed to its agent key): write on its own
    services only.
    acl-tokens.json gives it to the agent, rendered here on the node from the token file. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member and plan.acl.enabled %}
{%- set c = plan.consul %}
{%- set a = plan.acl %}
{%- set shared = plan.proxy.user != c.user %}
include:
  - apigee_mtls.service

{%- if plan.signer == grains.id %}
{%-   set model = salt["apigee_mtls.validate"]() %}

apigee-mtls-acl-bootstrapped:
  apigee_mtls.acl_bootstrapped:
    - name: {{ a.management_token_file }}
    - nodes: {{ model.nodes | rejectattr("retired") | map(attribute="id") | list | json }}
    - user: {{ c.user }}
    - group: {{ c.group }}
    - require:
      - file: apigee-mtls-config-acl-dir-managed
      - service: apigee-mtls-service-running
{%- endif %}

apigee-mtls-acl-agent-token-managed:
  apigee_mtls.acl_token_managed:
    - name: {{ a.agent_token_file }}
    - private_key: {{ c.tls_dir }}/agent-key.pem
    - signer: {{ plan.signer }}
    - policy: {{ a.policy }}
{%- if a.replication_token_file %}
    - replication_file: {{ a.replication_token_file }}
    - replication_policy: {{ a.replication_policy }}
{%- endif %}
    - user: {{ c.user }}
    - group: {{ c.group }}
    {#- the sidecars read the token too: 0640 for the group when they run as another user #}
    - mode: "{{ '0640' if shared else '0600' }}"
{%- if a.tokens_before_start %}
    {#- a secondary data center's server: its agent starts with its tokens (planner) #}
    - agent_required: False
    - require:
      - file: apigee-mtls-config-acl-dir-managed
      - x509: apigee-mtls-tls-agent-key-managed
{%- else %}
    - require:
      - file: apigee-mtls-config-acl-dir-managed
      - service: apigee-mtls-service-running
{%- if plan.signer == grains.id %}
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
{%- endif %}
    {#- a restart under the data center's lock needs the node's token #}
    - require_in:
      - apigee_mtls: apigee-mtls-service-current

apigee-mtls-acl-tokens-file-managed:
  file.managed:
    - name: {{ a.tokens_config }}
    - source: salt://apigee_mtls/files/acl-tokens.json.jinja
    - template: jinja
    - context:
        tokens: {{ {"agent": a.agent_token_file, "replication": a.replication_token_file} | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - show_changes: False
    - require:
      - apigee_mtls: apigee-mtls-acl-agent-token-managed
{%- if a.tokens_before_start %}
    - require_in:
      - service: apigee-mtls-service-running
{%- endif %}
    {#- a new token (first run, a policy change) reaches the agent by reload #}
    - onchanges_in:
      - cmd: apigee-mtls-service-reloaded
{%- endif %}
