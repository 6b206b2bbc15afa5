{%- from "apigee_mtls/map.jinja" import params with context %}
{%- set wants = salt["file.find"](params.systemd_unit_dir ~ "/multi-user.target.wants", name="apigee-mtls-proxy@*.service", type="l") if salt["file.directory_exists"](params.systemd_unit_dir ~ "/multi-user.target.wants") else [] %}
{%- set known = salt["service.get_running"]() + wants | map("replace", params.systemd_unit_dir ~ "/multi-user.target.wants/", "") | list %}
{%- for unit in known | map("replace", ".service", "") | unique | sort %}
{%-   set svc = unit %}
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
