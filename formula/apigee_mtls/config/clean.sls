{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- set config_dir = (plan.get("consul") or {}).get("config_dir", "/etc/consul.d") %}
include:
  - apigee_mtls.service.clean

{#- apigee-mtls-services.json is the mesh's file: apigee_mtls.mesh.clean (included through
    apigee_mtls.service.clean) removes it #}
{%- for f in ["consul.json", "encrypt.json", "acl-tokens.json", "acl-agent-master.json"] %}
apigee-mtls-config-{{ f }}-absent:
  file.absent:
    - name: {{ config_dir }}/{{ f }}
    - require:
      - sls: apigee_mtls.service.clean
{%- endfor %}
