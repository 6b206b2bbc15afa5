{#- iptables, in chains the formula owns (nat APIGEE-MTLS-OUT from OUTPUT, filter
    APIGEE-MTLS-IN from INPUT); no other rule is touched, no table is flushed.
    Applied after the sidecars are up; re-applied at boot by apigee-mtls-firewall.service. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member %}
include:
  - apigee_mtls.mesh

apigee-mtls-firewall-script-managed:
  file.managed:
    - name: {{ params.firewall_script }}
    - source: salt://apigee_mtls/files/apigee-mtls-firewall.sh
    - user: root
    - group: root
    - mode: "0755"

apigee-mtls-firewall-rules-managed:
  file.managed:
    - name: {{ params.state_dir }}/iptables.rules
    - contents: {{ plan.iptables_restore | json }}
    - user: root
    - group: root
    - mode: "0644"
    - require:
      - file: apigee-mtls-install-state-dir-managed

apigee-mtls-firewall-unit-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-firewall.service
    - source: salt://apigee_mtls/files/apigee-mtls-firewall.service.jinja
    - template: jinja
    - context:
        script: {{ params.firewall_script }}
        after: {{ params.firewall_unit_after | json }}
    - user: root
    - group: root
    - mode: "0644"

apigee-mtls-firewall-service-enabled:
  service.enabled:
    - name: apigee-mtls-firewall
    - require:
      - file: apigee-mtls-firewall-unit-managed
      - file: apigee-mtls-firewall-script-managed

apigee-mtls-firewall-chains-managed:
  apigee_mtls.firewall_managed:
    - rules_file: {{ params.state_dir }}/iptables.rules
    - apply_cmd: {{ params.firewall_script }} apply
    - require:
      - file: apigee-mtls-firewall-rules-managed
      - file: apigee-mtls-firewall-script-managed
{%- for svc in plan.proxies %}
      - service: apigee-mtls-mesh-proxy-{{ svc }}-running
{%- endfor %}
{%- endif %}
