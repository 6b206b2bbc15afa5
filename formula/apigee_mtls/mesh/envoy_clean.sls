{#- The Envoy data plane taken away: stopped, its schedule, unit, configuration, certificates
    and binary removed. Included by apigee_mtls.mesh.clean, and by apigee_mtls.mesh when the
    pillar names the built-in proxy (a node moving back from Envoy: Envoy holds the sidecar
    ports, so it stops before the built-in proxies start). Nothing to do on a node that never
    ran Envoy. -#}
{%- from "apigee_mtls/map.jinja" import params with context %}
apigee-mtls-mesh-envoy-certificates-schedule-absent:
  schedule.absent:
    - name: apigee-mtls-envoy-certificates
    - persist: True

apigee-mtls-mesh-envoy-dead:
  service.dead:
    - name: apigee-mtls-envoy
    - enable: False
    # stopped only when its unit is about to go: nothing to do (and nothing to preview) on a
    # node that never ran Envoy, without a shell check on every run
    - prereq:
      - file: apigee-mtls-mesh-envoy-unit-absent

apigee-mtls-mesh-envoy-unit-absent:
  file.absent:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-envoy.service

apigee-mtls-mesh-envoy-dir-absent:
  file.absent:
    - name: /etc/apigee-mtls/envoy
    - require:
      - service: apigee-mtls-mesh-envoy-dead

apigee-mtls-mesh-envoy-install-absent:
  file.absent:
    - name: /opt/apigee-mtls/envoy
    - require:
      - service: apigee-mtls-mesh-envoy-dead
