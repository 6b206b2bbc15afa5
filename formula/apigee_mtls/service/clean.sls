{#- Consul stops after its sidecars (apigee_mtls.mesh.clean, itself after the firewall). -#}
{%- from "apigee_mtls/map.jinja" import params with context %}
include:
  - apigee_mtls.mesh.clean

apigee-mtls-service-dead:
  service.dead:
    - name: consul
    - enable: False
    - require:
      - sls: apigee_mtls.mesh.clean

apigee-mtls-service-unit-absent:
  file.absent:
    - name: {{ params.systemd_unit_dir }}/consul.service
    - require:
      - service: apigee-mtls-service-dead

apigee-mtls-service-stop-dropin-absent:
  file.absent:
    - name: {{ params.systemd_unit_dir }}/consul.service.d/apigee-mtls-stop.conf
    - require:
      - service: apigee-mtls-service-dead

{#- systemd forgets the unit (a stopped agent may be listed as failed); the drop-in
    directory goes too unless an operator's drop-in is left in it #}
apigee-mtls-service-daemon-reload:
  cmd.run:
    - name: rmdir {{ params.systemd_unit_dir }}/consul.service.d 2>/dev/null; systemctl daemon-reload; systemctl reset-failed consul.service 2>/dev/null; true
    - onchanges:
      - file: apigee-mtls-service-unit-absent
      - file: apigee-mtls-service-stop-dropin-absent
