{#- The gossip keyring follows apigee_mtls:secrets:gossip_key: a new key is installed on every
    node, made primary, and the old one removed (consul keyring), from the signer, once for
    the cluster. encrypt.json only seeds the keyring of an agent's first start. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member and plan.signer == grains.id %}
include:
  - apigee_mtls.service
  - apigee_mtls.acl

apigee-mtls-keyring-managed:
  apigee_mtls.gossip_keyring_managed:
    - key_pillar: apigee_mtls:secrets:gossip_key
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.management_token_file }}
{%- endif %}
    - require:
      - service: apigee-mtls-service-running
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
{%- endif %}
