{#- Intentions (who may talk to whom): default deny, one allow per flow of the flow table.
    Written once for the cluster, from the signer (the formula's management node). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member and plan.signer == grains.id %}
include:
  - apigee_mtls.service
  - apigee_mtls.acl

apigee-mtls-intentions-managed:
  apigee_mtls.intentions_managed:
    - intentions: {{ salt["apigee_mtls.intentions"]() | json }}
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.management_token_file }}
{%- endif %}
    - require:
      - service: apigee-mtls-service-running
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
{%- endif %}
