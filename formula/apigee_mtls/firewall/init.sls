{#- iptables, in chains the formula owns (nat APIGEE-MTLS-OUT from OUTPUT, filter
    APIGEE-MTLS-IN from INPUT), and ip6tables (filter APIGEE-MTLS-IN from INPUT and
    APIGEE-MTLS-OUT from OUTPUT: refusals only, the mesh is IPv4); no other rule is touched, no
    table is flushed. Applied after the sidecars are up; re-applied at boot by
    apigee-mtls-firewall.service. Without an IPv6 plan (firewall:ipv6 false) the IPv6 rules
    file is absent: the script then leaves ip6tables alone (removing only its own old chains);
    the state skips IPv6 on a host without it. Then the established connections of hosts that
    are no longer members (a node removed from the pillar) are closed. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member %}
{%- set signer = plan.signer == grains.id %}
{%- set builtin = plan.proxy.data_plane == "builtin" %}
include:
  - apigee_mtls.mesh
{%- if signer %}
  - apigee_mtls.intentions
{%- endif %}

{#- the built-in proxies' egress identity move and drain; Envoy has one egress, no move #}
{%- if builtin %}
{#- a new egress identity (the move to role identities, a new component set): the rules move
    new connections to its proxy only once it reaches every upstream the previous proxy
    reaches (its intentions are written: on the signer, before this) #}
{%- set egress_upstreams = (plan.listeners | selectattr("id", "equalto", plan.egress.id) | first).upstreams %}
apigee-mtls-firewall-egress-switch-ready:
  apigee_mtls.egress_switch_ready:
    - name: {{ plan.egress.id }}
    - bind_address: {{ plan.egress.bind_address }}
    - upstreams: {{ egress_upstreams | json }}
    - draining_file: {{ plan.egress.draining_file }}
    - require:
      - service: apigee-mtls-mesh-proxy-{{ plan.egress.id }}-running
{%- if signer %}
      - sls: apigee_mtls.intentions
{%- endif %}
{%- endif %}

apigee-mtls-firewall-script-managed:
  file.managed:
    - name: {{ params.firewall_script }}
    - source: salt://apigee_mtls/files/apigee-mtls-firewall.sh
    - user: root
    - group: root
    - mode: "0755"

apigee-mtls-firewall-rules-managed:
  file.managed:
    - name: {{ params.state_dir }}/iptables.rules
    - contents: {{ plan.iptables_restore | json }}
    - user: root
    - group: root
    - mode: "0644"
    - require:
      - file: apigee-mtls-install-state-dir-managed

{%- if plan.ip6tables_restore is not none %}
apigee-mtls-firewall-rules6-managed:
  file.managed:
    - name: {{ params.state_dir }}/ip6tables.rules
    - contents: {{ plan.ip6tables_restore | json }}
    - user: root
    - group: root
    - mode: "0644"
    - require:
      - file: apigee-mtls-install-state-dir-managed
{%- else %}
apigee-mtls-firewall-rules6-managed:
  file.absent:
    - name: {{ params.state_dir }}/ip6tables.rules
{%- endif %}

apigee-mtls-firewall-unit-managed:
  file.managed:
    - name: {{ params.systemd_unit_dir }}/apigee-mtls-firewall.service
    - source: salt://apigee_mtls/files/apigee-mtls-firewall.service.jinja
    - template: jinja
    - context:
        script: {{ params.firewall_script }}
        after: {{ params.firewall_unit_after | json }}
    - user: root
    - group: root
    - mode: "0644"

apigee-mtls-firewall-service-enabled:
  service.enabled:
    - name: apigee-mtls-firewall
    - require:
      - file: apigee-mtls-firewall-unit-managed
      - file: apigee-mtls-firewall-script-managed

apigee-mtls-firewall-chains-managed:
  apigee_mtls.firewall_managed:
    - rules_file: {{ params.state_dir }}/iptables.rules
    - rules6_file: {{ params.state_dir }}/ip6tables.rules
    - apply_cmd: {{ params.firewall_script }} apply
    - firewall: {{ plan.firewall | json }}
    - require:
      - file: apigee-mtls-firewall-rules-managed
      - file: apigee-mtls-firewall-rules6-managed
      - file: apigee-mtls-firewall-script-managed
{%- if builtin %}
      - apigee_mtls: apigee-mtls-firewall-egress-switch-ready
{%- for svc in plan.proxies %}
      - service: apigee-mtls-mesh-proxy-{{ svc }}-running
{%- endfor %}
{%- else %}
      - service: apigee-mtls-mesh-envoy-running
{%- endif %}

{%- if builtin %}
{#- a previous egress proxy stops once it carries no connection (later runs retry) #}
apigee-mtls-firewall-egress-drained:
  apigee_mtls.egress_drained:
    - name: {{ plan.egress.draining_file }}
    - planned_id: {{ plan.egress.id }}
    - listener_dir: {{ params.state_dir }}/listeners
    - bin_path: {{ plan.consul.bin }}
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.agent_master_token_file }}
{%- endif %}
    - group: {{ plan.consul.group }}
    - require:
      - apigee_mtls: apigee-mtls-firewall-chains-managed
{%- endif %}

{#- a node removed from the pillar: its established connections to Consul's and the sidecar
    ports end with this run (the chains above refuse its packets, established or not; this
    closes the sockets), once the chains are in place so that it cannot reconnect between #}
apigee-mtls-firewall-stale-connections-closed:
  apigee_mtls.stale_connections_closed:
    - ports: {{ plan.firewall.member_ports | json }}
    - members: {{ plan.firewall.members | json }}
    - require:
      - apigee_mtls: apigee-mtls-firewall-chains-managed
{%- endif %}
