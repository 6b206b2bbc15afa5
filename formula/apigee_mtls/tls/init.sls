{#- Agent TLS: this node's key is generated here and never leaves it; the certificate is
    signed by the cluster signer (asked through the master's reactor), whose CA key never leaves the signer. The
    CA bundle holds the trusted CA generations (a CA rotation trusts two for a while); a new
    certificate or bundle reloads Consul (service/init.sls). -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
include:
  - apigee_mtls.install
{%- if plan.signer == grains.id %}
  - apigee_mtls.tls.ca
{%- endif %}

apigee-mtls-tls-agent-key-managed:
  x509.private_key_managed:
    - name: {{ c.tls_dir }}/agent-key.pem
    - algo: ec
    - keysize: 256
    - new: False
    - user: {{ c.user }}
    - group: {{ c.group }}
    - mode: "0600"
    - require:
      - file: apigee-mtls-install-tls-dir-managed
      - user: apigee-mtls-install-user-present

apigee-mtls-tls-agent-cert-managed:
  apigee_mtls.agent_certificate_managed:
    - name: {{ c.tls_dir }}/agent.pem
    - private_key: {{ c.tls_dir }}/agent-key.pem
    - ca_bundle: {{ c.tls_dir }}/ca.pem
    - user: root
    - group: {{ c.group }}
    - mode: "0644"
    - signer: {{ plan.signer }}
    - identity: {{ plan.certificate | json }}
    - ca_generations: {{ plan.ca_generations | json }}
    - days_remaining: {{ plan.tls.cert_days_remaining }}
    - require:
      - x509: apigee-mtls-tls-agent-key-managed
{%- if plan.signer == grains.id %}
{#-   the signer answers its own request too: every trusted CA generation must exist #}
{%-   for ca in plan.ca_generations %}
      - x509: apigee-mtls-tls-ca-cert-managed{{ "" if loop.first else "-gen-" ~ ca.generation }}
{%-   endfor %}
{%- endif %}
{%- endif %}
