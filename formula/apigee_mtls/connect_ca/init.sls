{#- Optional: the organisation's CA (connect_ca:root_cert, key in secrets:connect_ca_key on
    the signer only) as the root of the mesh certificates. Set once through Consul's CA
    configuration API from the signer, with the management token; Consul cross-signs the
    previous root, so sidecars move to the new leaves without dropping connections. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member and plan.signer == grains.id and plan.connect_ca.root_cert %}
include:
  - apigee_mtls.acl

apigee-mtls-connect-ca-managed:
  apigee_mtls.connect_ca_managed:
    - name: connect-ca
    - root_cert: {{ plan.connect_ca.root_cert | json }}
    - key_pillar: apigee_mtls:secrets:connect_ca_key
    - token_file: {{ plan.acl.management_token_file }}
    - require:
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
