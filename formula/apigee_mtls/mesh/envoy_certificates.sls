{#- The Envoy data plane's certificates alone (proxy:data_plane: envoy): apigee_mtls.mesh.envoy
    includes it, and the minion's schedule (apigee-mtls-envoy-certificates, every hour)
    applies it between applies, so that a leaf the agent renewed or new roots reach Envoy
    (it watches the files) without an operator's apply. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member and plan.envoy %}
{%- set c = plan.consul %}
{%- set e = plan.envoy %}
apigee-mtls-mesh-envoy-certificates-managed:
  apigee_mtls_envoy.certificates_managed:
    - name: {{ e.certs_dir }}
    - services: {{ e.services | json }}
    - identity: {{ e.identity }}
    - token_file: {{ plan.acl.agent_token_file | default(None) | json }}
    {#- the signer may switch the mesh root to the organisation's CA in the same run #}
    - root_cert: {{ plan.connect_ca.root_cert | json }}
    - user: {{ plan.proxy.user }}
    - group: {{ c.group }}
{%- endif %}
