{#- The cluster CA, on the signer only (apigee_mtls:tls:signer). Its private key is created
    here and never copied anywhere: agents send public keys and get certificates back. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member and plan.signer == grains.id %}
apigee-mtls-tls-ca-dir-managed:
  file.directory:
    - name: {{ params.state_dir }}/ca
    - user: root
    - group: root
    - mode: "0700"
    - makedirs: True

apigee-mtls-tls-ca-key-managed:
  x509.private_key_managed:
    - name: {{ params.state_dir }}/ca/ca-key.pem
    - algo: ec
    - keysize: 384
    - new: False
    - user: root
    - group: root
    - mode: "0600"
    - require:
      - file: apigee-mtls-tls-ca-dir-managed

apigee-mtls-tls-ca-cert-managed:
  x509.certificate_managed:
    - name: {{ params.state_dir }}/ca/ca.pem
    - signing_private_key: {{ params.state_dir }}/ca/ca-key.pem
    - CN: apigee_mtls cluster CA
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
      - x509: apigee-mtls-tls-ca-key-managed
{%- endif %}
