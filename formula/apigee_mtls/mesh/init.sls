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

apigee-mtls-mesh-listener-dir-managed:
  file.directory:
    - name: {{ params.state_dir }}/listeners
    - user: root
    - group: root
    - mode: "0755"
    - require:
      - file: apigee-mtls-install-state-dir-managed

{#- The built-in proxy follows upstream changes live, but binds its public listener once:
    a moved listener (port or address) needs a restart. Each sidecar's listener settings are
    kept in a small file; when it changes the sidecar is stopped, and every stop happens
    before any start, so a listener can move to a port another sidecar is giving up
    (a proxy that fails to bind keeps running without its listener: measured in the lab). #}
{%- for service in plan.services %}
{%-   set svc = service.id %}
{%-   set sidecar = service.connect.sidecar_service %}
apigee-mtls-mesh-proxy-{{ svc }}-listener-managed:
  file.serialize:
    - name: {{ params.state_dir }}/listeners/{{ svc }}.json
    - serializer: json
    - dataset:
        address: {{ sidecar.address }}
        port: {{ sidecar.port }}
        local_service_address: {{ sidecar.proxy.local_service_address }}
        local_service_port: {{ sidecar.proxy.local_service_port }}
    - mode: "0644"
    - require:
      - file: apigee-mtls-mesh-listener-dir-managed

apigee-mtls-mesh-proxy-{{ svc }}-stopped-for-move:
  cmd.run:
    - name: systemctl stop apigee-mtls-proxy@{{ svc }}
    - onchanges:
      - file: apigee-mtls-mesh-proxy-{{ svc }}-listener-managed
{%- endfor %}

{%- for svc in plan.proxies %}
apigee-mtls-mesh-proxy-{{ svc }}-running:
  service.running:
    - name: apigee-mtls-proxy@{{ svc }}
    - enable: True
    - require:
      - service: apigee-mtls-service-running
      - cmd: apigee-mtls-service-reloaded
{%-   for other in plan.proxies %}
      - cmd: apigee-mtls-mesh-proxy-{{ other }}-stopped-for-move
{%-   endfor %}
    - watch:
      - file: apigee-mtls-mesh-proxy-unit-managed
{%- endfor %}

{#- systemd lists template instances as running, and as enabled only through the wants links #}
{%- set wants = salt["file.find"](params.systemd_unit_dir ~ "/multi-user.target.wants", name="apigee-mtls-proxy@*.service", type="l") if salt["file.directory_exists"](params.systemd_unit_dir ~ "/multi-user.target.wants") else [] %}
{%- set known = salt["service.get_running"]() + wants | map("replace", params.systemd_unit_dir ~ "/multi-user.target.wants/", "") | list %}
{%- for unit in known | map("replace", ".service", "") | unique | sort %}
{%-   set svc = unit %}
{%-   if svc.startswith("apigee-mtls-proxy@") and svc[18:] not in plan.proxies %}
apigee-mtls-mesh-proxy-{{ svc[18:] }}-dead:
  service.dead:
    - name: {{ svc }}
    - enable: False

apigee-mtls-mesh-proxy-{{ svc[18:] }}-listener-absent:
  file.absent:
    - name: {{ params.state_dir }}/listeners/{{ svc[18:] }}.json
{%-   endif %}
{%- endfor %}
{%- endif %}
