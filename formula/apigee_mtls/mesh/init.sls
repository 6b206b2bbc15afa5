{#- Sidecar proxies: one `consul connect proxy -sidecar-for <service>` unit per ingress
    service (public listener = the allocated port) and one for the node's egress service
    (upstreams on 127.0.0.1). Units start after Consul, restart on failure, start at boot.
    Units of services that left the plan are stopped and disabled. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
include:
  - apigee_mtls.service

apigee-mtls-mesh-proxy-unit-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-proxy@.service
    - source: salt://apigee_mtls/files/apigee-mtls-proxy@.service.jinja
    - template: jinja
    - context:
        consul: {{ c | json }}
        proxy: {{ plan.proxy | json }}
    - user: root
    - group: root
    - mode: "0644"

{%- for svc in plan.proxies %}
apigee-mtls-mesh-proxy-{{ svc }}-running:
  service.running:
    - name: apigee-mtls-proxy@{{ svc }}
    - enable: True
    - require:
      - service: apigee-mtls-service-running
      - cmd: apigee-mtls-service-reloaded
    - watch:
      - file: apigee-mtls-mesh-proxy-unit-managed
{%- endfor %}

{%- for unit in salt["service.get_enabled"]() %}
{%-   set svc = unit | replace(".service", "") %}
{%-   if svc.startswith("apigee-mtls-proxy@") and svc[18:] not in plan.proxies %}
apigee-mtls-mesh-proxy-{{ svc[18:] }}-dead:
  service.dead:
    - name: {{ svc }}
    - enable: False
{%-   endif %}
{%- endfor %}
{%- endif %}
