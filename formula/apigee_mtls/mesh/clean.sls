{%- from "apigee_mtls/map.jinja" import params with context %}
{%- for unit in salt["service.get_all"]() %}
{%-   set svc = unit | replace(".service", "") %}
{%-   if svc.startswith("apigee-mtls-proxy@") and svc != "apigee-mtls-proxy@" %}
apigee-mtls-mesh-proxy-{{ svc[18:] }}-dead:
  service.dead:
    - name: {{ svc }}
    - enable: False
    - require_in:
      - file: apigee-mtls-mesh-proxy-unit-absent
{%-   endif %}
{%- endfor %}

apigee-mtls-mesh-proxy-unit-absent:
  file.absent:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-proxy@.service
