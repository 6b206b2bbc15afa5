{#- apigee_mtls: Consul service mesh (mutual TLS) between Apigee Edge components.
    Order: install -> tls -> config -> service -> mesh (sidecars) -> firewall -> intentions
    -> keyring (gossip key rotation). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
include:
  - apigee_mtls.install
  - apigee_mtls.tls
  - apigee_mtls.config
  - apigee_mtls.service
  - apigee_mtls.mesh
  - apigee_mtls.firewall
  - apigee_mtls.intentions
  - apigee_mtls.keyring
{%- else %}
apigee-mtls-not-a-member:
  test.succeed_without_changes:
    - name: "{{ grains.id }} is not in apigee_mtls:nodes: nothing to do"
{%- endif %}
