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
include:
  - apigee_mtls.mesh

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
{%- for svc in plan.proxies %}
      - service: apigee-mtls-mesh-proxy-{{ svc }}-running
{%- endfor %}

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
