{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- set tls_dir = (plan.get("consul") or {}).get("tls_dir", "/etc/consul.d/tls") %}
include:
  - apigee_mtls.service.clean

apigee-mtls-tls-agent-files-absent:
  file.absent:
    - name: {{ tls_dir }}
    - require:
      - sls: apigee_mtls.service.clean

apigee-mtls-tls-ca-absent:
  file.absent:
    - name: {{ params.state_dir }}/ca
    - require:
      - sls: apigee_mtls.service.clean
