{#- Tokens and the agent's token config. The tokens themselves live in Consul's data, which
    install/clean.sls removes with the data directory. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- set c = plan.get("consul") or {} %}
{%- set config_dir = c.get("config_dir", "/etc/consul.d") %}
include:
  - apigee_mtls.service.clean

apigee-mtls-acl-tokens-file-absent:
  file.absent:
    - name: {{ config_dir }}/acl-tokens.json
    - require:
      - sls: apigee_mtls.service.clean

apigee-mtls-acl-dir-absent:
  file.absent:
    - name: {{ config_dir }}/acl
    - require:
      - sls: apigee_mtls.service.clean
