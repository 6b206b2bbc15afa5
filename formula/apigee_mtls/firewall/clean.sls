{#- Remove the formula's chains and jumps (nat OUTPUT and filter INPUT are left exactly as
    they were before the formula), then the unit, script and rules file. -#}
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
    - onlyif: test -x {{ params.firewall_script }} && { iptables -w -t nat -S APIGEE-MTLS-OUT || iptables -w -S APIGEE-MTLS-IN; } >/dev/null 2>&1
    - require:
      - service: apigee-mtls-firewall-service-disabled

{%- for f in [params.systemd_unit_dir ~ "/apigee-mtls-firewall.service", params.firewall_script, params.state_dir ~ "/iptables.rules"] %}
apigee-mtls-firewall-file-absent-{{ loop.index }}:
  file.absent:
    - name: {{ f }}
    - require:
      - cmd: apigee-mtls-firewall-chains-absent
      - service: apigee-mtls-firewall-service-disabled
{%- endfor %}
