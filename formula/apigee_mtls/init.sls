{#- apigee_mtls: Consul service mesh (mutual TLS) between Apigee Edge components.
    Order: install -> tls -> config -> service -> acl (bootstrap on the signer, each node's
    token) -> connect_ca (optional organisation CA) -> mesh (sidecars) -> firewall ->
    intentions -> keyring (gossip key rotation). -#}
{#- A staged rollout (orch/rollout.sls) passes apigee_mtls_rollout:stage inline: agents, then
    mesh, then redirect (firewall without the lockdown), then full; a plain run is full. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
{%- set stage = salt["apigee_mtls.rollout_stage"]() %}
include:
  - apigee_mtls.install
  - apigee_mtls.tls
  - apigee_mtls.config
  - apigee_mtls.service
  - apigee_mtls.acl
{%- if stage != "agents" %}
  - apigee_mtls.connect_ca
  - apigee_mtls.mesh
  - apigee_mtls.intentions
  - apigee_mtls.keyring
{%- endif %}
{%- if stage in ("redirect", "full") %}
  - apigee_mtls.firewall
{%- endif %}
{%- else %}
apigee-mtls-not-a-member:
  test.succeed_without_changes:
    - name: "{{ grains.id }} is not in apigee_mtls:nodes: nothing to do"
{%- endif %}
