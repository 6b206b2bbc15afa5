{#- Remove the formula's chains and jumps (nat OUTPUT and filter INPUT are left exactly as
    they were before the formula), then the unit, script and rules file. -#}
{%- from "apigee_mtls/map.jinja" import params with context %}
apigee-mtls-firewall-chains-absent:
  cmd.run:
    - name: {{ params.firewall_script }} remove
    - onlyif: test -x {{ params.firewall_script }}

apigee-mtls-firewall-service-disabled:
  service.disabled:
    - name: apigee-mtls-firewall
    - onlyif: test -e {{ params.systemd_unit_dir }}/apigee-mtls-firewall.service

{%- for f in [params.systemd_unit_dir ~ "/apigee-mtls-firewall.service", params.firewall_script, params.state_dir ~ "/iptables.rules"] %}
apigee-mtls-firewall-file-absent-{{ loop.index }}:
  file.absent:
    - name: {{ f }}
    - require:
      - cmd: apigee-mtls-firewall-chains-absent
      - service: apigee-mtls-firewall-service-disabled
{%- endfor %}
