{#- Sidecars stop after the redirect rules are gone (apigee_mtls.firewall.clean): traffic
    goes direct again instead of to a stopped sidecar. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- set config_dir = (plan.get("consul") or {}).get("config_dir", "/etc/consul.d") %}
include:
  - apigee_mtls.firewall.clean
  - apigee_mtls.mesh.envoy_clean

{#- the service definitions (apigee_mtls.mesh's file); a running agent keeps their
    registrations until its next reload or stop #}
apigee-mtls-mesh-services-file-absent:
  file.absent:
    - name: {{ config_dir }}/apigee-mtls-services.json
    - require:
      - sls: apigee_mtls.firewall.clean

{#- previous egress instances kept registered while their proxies drained #}
apigee-mtls-mesh-draining-file-absent:
  file.absent:
    - name: {{ config_dir }}/apigee-mtls-draining.json
    - require:
      - sls: apigee_mtls.firewall.clean

{%- set wants = salt["file.find"](params.systemd_unit_dir ~ "/multi-user.target.wants", name="apigee-mtls-proxy@*.service", type="l") if salt["file.directory_exists"](params.systemd_unit_dir ~ "/multi-user.target.wants") else [] %}
{%- set known = salt["service.get_running"]() + wants | map("replace", params.systemd_unit_dir ~ "/multi-user.target.wants/", "") | list %}
{%- for unit in known | map("replace", ".service", "") | unique | sort %}
{%-   set svc = unit %}
{%-   if svc.startswith("apigee-mtls-proxy@") and svc != "apigee-mtls-proxy@" %}
apigee-mtls-mesh-proxy-{{ svc[18:] }}-dead:
  service.dead:
    - name: {{ svc }}
    - enable: False
    - require:
      - sls: apigee_mtls.firewall.clean
    - require_in:
      - file: apigee-mtls-mesh-proxy-unit-absent
{%-   endif %}
{%- endfor %}

apigee-mtls-mesh-proxy-unit-absent:
  file.absent:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-proxy@.service
    - require:
      - sls: apigee_mtls.firewall.clean

{#- systemd forgets the template's instances and their slice #}
apigee-mtls-mesh-systemd-forget:
  cmd.run:
    - name: systemctl stop 'system-apigee\x2dmtls\x2dproxy.slice' 2>/dev/null; systemctl reset-failed 'apigee-mtls-proxy@*' 2>/dev/null; systemctl daemon-reload; true
    - onlyif: systemctl list-units --all --no-legend --plain 'apigee-mtls-proxy@*' 'system-apigee*' | grep -v 'not-found *inactive *dead' | grep -q .
    - require:
      - file: apigee-mtls-mesh-proxy-unit-absent
    - order: last

{#- the Envoy data plane (apigee_mtls.mesh.envoy_clean), whichever data plane the pillar
    names now, once the redirect rules are gone #}
extend:
  apigee-mtls-mesh-envoy-dead:
    service.dead:
      - require:
        - sls: apigee_mtls.firewall.clean
  apigee-mtls-mesh-envoy-unit-absent:
    file.absent:
      - require:
        - sls: apigee_mtls.firewall.clean
