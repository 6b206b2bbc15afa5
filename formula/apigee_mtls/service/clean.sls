{%- from "apigee_mtls/map.jinja" import params with context %}
apigee-mtls-service-dead:
  service.dead:
    - name: consul
    - enable: False

apigee-mtls-service-unit-absent:
  file.absent:
    - name: {{ params.systemd_unit_dir }}/consul.service
    - require:
      - service: apigee-mtls-service-dead

apigee-mtls-service-daemon-reload:
  cmd.run:
    - name: systemctl daemon-reload
    - onchanges:
      - file: apigee-mtls-service-unit-absent
