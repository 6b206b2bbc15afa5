{#- The cluster CA, on the signer only (apigee_mtls:tls:signer). Its private key is created
    here and never copied anywhere: agents send public keys and get certificates back.
    CA rotation: every generation the pillar trusts (tls:ca_generation, then tls:ca_trust)
    exists here (generation 1 in ca.pem / ca-key.pem, N in ca-N.pem / ca-key-N.pem); the
    files of a generation no longer trusted are removed, once the signing one exists. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member and plan.signer == grains.id %}
{%- set ca_dir = params.state_dir ~ "/ca" %}
{%- set trusted = plan.ca_generations | map(attribute="generation") | list %}
apigee-mtls-tls-ca-dir-managed:
  file.directory:
    - name: {{ ca_dir }}
    - user: root
    - group: root
    - mode: "0700"
    - makedirs: True
{%- for ca in plan.ca_generations %}
{#-   the signing generation keeps the IDs the formula always had #}
{%-   set suffix = "" if loop.first else "-gen-" ~ ca.generation %}

apigee-mtls-tls-ca-key-managed{{ suffix }}:
  x509.private_key_managed:
    - name: {{ ca_dir }}/{{ ca.key }}
    - algo: ec
    - keysize: 384
    - new: False
    - user: root
    - group: root
    - mode: "0600"
    - require:
      - file: apigee-mtls-tls-ca-dir-managed

apigee-mtls-tls-ca-cert-managed{{ suffix }}:
  x509.certificate_managed:
    - name: {{ ca_dir }}/{{ ca.cert }}
    - signing_private_key: {{ ca_dir }}/{{ ca.key }}
    - CN: {{ ca.cn }}
    - O: apigee_mtls
    - basicConstraints: "critical, CA:true, pathlen:0"
    - keyUsage: "critical, cRLSign, keyCertSign"
    - subjectKeyIdentifier: hash
    - days_valid: {{ plan.tls.ca_days_valid }}
    - days_remaining: 30
    - digest: sha256
    - user: root
    - group: root
    - mode: "0644"
    - require:
      - x509: apigee-mtls-tls-ca-key-managed{{ suffix }}
{%- endfor %}
{#- a generation the pillar no longer trusts (the end of a rotation): its key goes, and its
    certificate, but only once the signing generation's certificate is in place #}
{%- for old in salt["apigee_mtls.ca_files"](ca_dir) if old.generation not in trusted %}
{%-   for kind in ("key", "cert") %}

apigee-mtls-tls-ca-{{ kind }}-absent-gen-{{ old.generation }}:
  file.absent:
    - name: {{ old[kind] }}
    - require:
      - x509: apigee-mtls-tls-ca-cert-managed
{%-   endfor %}
{%- endfor %}
{%- endif %}
