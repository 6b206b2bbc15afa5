{#- Remove the formula's chains and jumps, IPv4 and IPv6 (nat OUTPUT, filter INPUT and
    ip6tables INPUT/OUTPUT are left exactly as they were before the formula), then the unit,
    script and rules files. -#}
{%- from "apigee_mtls/map.jinja" import params with context %}
{#- stopping the unit runs its ExecStop (remove); the script also runs directly, for chains
    left by an interrupted run while the unit was not active #}
apigee-mtls-firewall-service-disabled:
  service.dead:
    - name: apigee-mtls-firewall
    - enable: False
    - onlyif: test -e {{ params.systemd_unit_dir }}/apigee-mtls-firewall.service

apigee-mtls-firewall-chains-absent:
  cmd.run:
    - name: {{ params.firewall_script }} remove
    - onlyif: test -x {{ params.firewall_script }} && { iptables -w -t nat -S APIGEE-MTLS-OUT || iptables -w -S APIGEE-MTLS-IN || ip6tables -w -S APIGEE-MTLS-IN || ip6tables -w -S APIGEE-MTLS-OUT; } >/dev/null 2>&1
    - require:
      - service: apigee-mtls-firewall-service-disabled

{%- for f in [params.systemd_unit_dir ~ "/apigee-mtls-firewall.service", params.firewall_script, params.state_dir ~ "/iptables.rules", params.state_dir ~ "/ip6tables.rules"] %}
apigee-mtls-firewall-file-absent-{{ loop.index }}:
  file.absent:
    - name: {{ f }}
    - require:
      - cmd: apigee-mtls-firewall-chains-absent
      - service: apigee-mtls-firewall-service-disabled
{%- endfor %}
