{#- The mesh on this node: the service definitions (ingress services, the egress service,
    their sidecars) and the sidecar proxies, one `consul connect proxy -sidecar-for <service>`
    unit per ingress service (public listener = the allocated port) and one for the node's
    egress service (upstreams on 127.0.0.1). Units start after Consul, restart on failure,
    start at boot. Units of services that left the plan are stopped and disabled. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
{%- set builtin = plan.proxy.data_plane == "builtin" %}
include:
  - apigee_mtls.service
{%- if plan.acl.enabled %}
  - apigee_mtls.acl
{%- endif %}
{%- if builtin %}
  - apigee_mtls.mesh.envoy_clean
{%- else %}
  - apigee_mtls.mesh.envoy
{%- endif %}

{#- a previous egress instance of this node (an identity change: the move to role identities,
    a new component set) stays registered, from the draining file, while its proxy drains;
    apigee_mtls.egress_drained (apigee_mtls.firewall) stops it #}
{%- if builtin %}
apigee-mtls-mesh-egress-draining:
  apigee_mtls.egress_draining:
    - name: {{ plan.egress.draining_file }}
    - services_file: {{ plan.egress.services_file }}
    - planned_id: {{ plan.egress.id }}
    - group: {{ c.group }}
    - require:
      - file: apigee-mtls-install-config-dir-managed
    - require_in:
      - file: apigee-mtls-mesh-services-file-managed
    - onchanges_in:
      - cmd: apigee-mtls-service-reloaded
{%- endif %}

{#- apigee-mtls-services.json: with ACLs each definition carries the node's token, so it is
    rendered on the minion from the token file (like encrypt.json) and its diff is not shown;
    a change reaches the agent by `consul reload` #}
apigee-mtls-mesh-services-file-managed:
  file.managed:
    - name: {{ c.config_dir }}/apigee-mtls-services.json
    - source: salt://apigee_mtls/files/services.json.jinja
    - template: jinja
    - context:
        services: {{ plan.services | json }}
        token_file: {{ plan.acl.agent_token_file | default(None) | json }}
    - user: root
    - group: {{ c.group }}
    - mode: "0640"
    - show_changes: False
    - require:
      - file: apigee-mtls-install-config-dir-managed
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-agent-token-managed
{%- endif %}
    - onchanges_in:
      - cmd: apigee-mtls-service-reloaded

{%- if builtin %}
apigee-mtls-mesh-proxy-unit-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-proxy@.service
    - source: salt://apigee_mtls/files/apigee-mtls-proxy@.service.jinja
    - template: jinja
    - context:
        consul: {{ c | json }}
        proxy: {{ plan.proxy | json }}
        token_file: {{ plan.acl.agent_token_file | default(None) | json }}
        start_limit_in_service: {{ params.systemd_start_limit_in_service | json }}
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

{#- Each sidecar's listeners: apigee_mtls.sidecar_listeners_managed keeps a record of them
    and stops the sidecars that must restart (a public listener that moves, an upstream port
    the proxy still holds for another destination) before any sidecar starts, so that
    listeners can swap ports; the others follow new and moved upstreams live. #}
{%- for sidecar in plan.listeners %}
{%-   set svc = sidecar.id %}
apigee-mtls-mesh-proxy-{{ svc }}-listener-managed:
  apigee_mtls.sidecar_listeners_managed:
    - name: {{ params.state_dir }}/listeners/{{ svc }}.json
    - unit: apigee-mtls-proxy@{{ svc }}
    - listener: {{ sidecar.listener | json }}
    - upstreams: {{ sidecar.upstreams | json }}
    - require:
      - file: apigee-mtls-mesh-listener-dir-managed
      - cmd: apigee-mtls-service-reloaded
    - require_in:
{%-   for other in plan.proxies %}
      - service: apigee-mtls-mesh-proxy-{{ other }}-running
{%-   endfor %}
{%- endfor %}

{%- for svc in plan.proxies %}
apigee-mtls-mesh-proxy-{{ svc }}-running:
  service.running:
    - name: apigee-mtls-proxy@{{ svc }}
    - enable: True
    {#- a sidecar exits (and systemd restarts it 2 s later) while its agent cannot resolve
        the node's token: a node just added, before the servers' firewalls admit it (they do
        in the same run); caught between two starts it looks dead #}
    - retry:
        attempts: 10
        interval: 3
    - require:
      - service: apigee-mtls-service-running
      - cmd: apigee-mtls-service-reloaded
      - apigee_mtls: apigee-mtls-mesh-proxy-{{ svc }}-listener-managed
      - service: apigee-mtls-mesh-envoy-dead
    - watch:
      - file: apigee-mtls-mesh-proxy-unit-managed
{%- endfor %}

{%- if plan.acl.enabled %}
{#- a sidecar reads the node's token when it starts: a new token (the node was removed and
    added back) restarts the sidecars that started before it (apigee_mtls.sidecars_current) #}
apigee-mtls-mesh-sidecars-token-current:
  apigee_mtls.sidecars_current:
    - name: {{ plan.acl.agent_token_file }}
    - units: {{ plan.proxies | map("regex_replace", "^", "apigee-mtls-proxy@") | list | json }}
    - require:
{%-   for svc in plan.proxies %}
      - service: apigee-mtls-mesh-proxy-{{ svc }}-running
{%-   endfor %}
    - require_in:
      - apigee_mtls: apigee-mtls-mesh-leaf-certificate-ready
{%- endif %}
{%- endif %}

{#- the end of the run: this node's agent obtains a Connect leaf certificate (what every
    sidecar needs), or the run fails saying why; a secondary data center's leader heals its
    CA here (apigee_mtls.connect_leaf_ready) #}
{%- set leaf = plan.leaf_check %}
apigee-mtls-mesh-leaf-certificate-ready:
  apigee_mtls.connect_leaf_ready:
    - name: {{ leaf.service }}
    - token_file: {{ plan.acl.agent_token_file | default(None) | json }}
    - datacenter: {{ leaf.datacenter }}
    - primary_datacenter: {{ leaf.primary_datacenter }}
    - servers: {{ leaf.servers | json }}
    - heal_secondary_ca: {{ leaf.heal_secondary_ca }}
    - address: {{ leaf.address }}
    - require:
{%- if builtin %}
{%-   for svc in plan.proxies %}
      - service: apigee-mtls-mesh-proxy-{{ svc }}-running
{%-   endfor %}
{%- else %}
      - service: apigee-mtls-mesh-envoy-running
{%- endif %}

{#- systemd lists template instances as running, and as enabled only through the wants links #}
{%- if builtin %}
{%- set wants_dir = params.systemd_unit_dir ~ "/multi-user.target.wants" %}
{%- set wants = salt["file.find"](wants_dir, name="apigee-mtls-proxy@*.service", type="l")
                if salt["file.directory_exists"](wants_dir) else [] %}
{%- set known = salt["service.get_running"]() + wants | map("replace", params.systemd_unit_dir ~ "/multi-user.target.wants/", "") | list %}
{%- for unit in known | map("replace", ".service", "") | unique | sort %}
{%-   set svc = unit %}
{#-   (a previous egress proxy drains: apigee_mtls.egress_drained stops it) #}
{%-   if svc.startswith("apigee-mtls-proxy@") and svc[18:] not in plan.proxies
         and not svc[18:].startswith("egress-") %}
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
{%- endif %}
