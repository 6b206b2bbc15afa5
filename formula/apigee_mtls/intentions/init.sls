{#- Intentions (who may talk to whom): default deny, one allow per (role identity, ingress
    service) of the flow table.
    Written once for the cluster, from the signer (the formula's management node). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member and plan.signer == grains.id %}
include:
  - apigee_mtls.service
  - apigee_mtls.acl

{#- the intentions are computed by the state from the pillar (apigee_mtls.intentions), not
    carried by the rendered SLS #}
{%- set model = salt["apigee_mtls.validate"]() %}
apigee-mtls-intentions-managed:
  apigee_mtls.intentions_managed:
    {#- a draining identity keeps its allows only through an instance on a member #}
    - members: {{ model.nodes | rejectattr("retired") | map(attribute="id") | list | json }}
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.management_token_file }}
{%- endif %}
    - require:
      - service: apigee-mtls-service-running
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
{%- endif %}
