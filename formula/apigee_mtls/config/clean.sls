{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- set config_dir = (plan.get("consul") or {}).get("config_dir", "/etc/consul.d") %}
include:
  - apigee_mtls.service.clean

{%- for f in ["consul.json", "encrypt.json", "apigee-mtls-services.json", "acl-tokens.json", "acl-agent-master.json"] %}
apigee-mtls-config-{{ f }}-absent:
  file.absent:
    - name: {{ config_dir }}/{{ f }}
    - require:
      - sls: apigee_mtls.service.clean
{%- endfor %}
