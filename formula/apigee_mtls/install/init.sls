{#- Consul binary (pillar chooses: binary with checked hash, zip archive, or OS package),
    the consul system user, and the agent's directories. -#}
{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- if plan.member %}
{%- set c = plan.consul %}
apigee-mtls-install-pkgs-installed:
  pkg.installed:
    - pkgs: {{ params.pkgs | json }}

apigee-mtls-install-group-present:
  group.present:
    - name: {{ c.group }}
    - system: True

apigee-mtls-install-user-present:
  user.present:
    - name: {{ c.user }}
    - gid: {{ c.group }}
    - system: True
    - home: {{ c.data_dir }}
    - createhome: False
    - shell: {{ params.nologin_shell }}
    - require:
      - group: apigee-mtls-install-group-present

{%- if plan.proxy.user != c.user %}
apigee-mtls-install-proxy-user-present:
  user.present:
    - name: {{ plan.proxy.user }}
    - gid: {{ c.group }}
    - system: True
    - createhome: False
    - home: /nonexistent
    - shell: {{ params.nologin_shell }}
    - require:
      - group: apigee-mtls-install-group-present
{%- endif %}

{%- if c.install.method == "binary" %}
apigee-mtls-install-consul-binary-managed:
  file.managed:
    - name: {{ c.bin }}
    - source: {{ c.install.source }}
    - source_hash: {{ c.install.source_hash }}
    - user: root
    - group: root
    - mode: "0755"
    - show_changes: False
{%- elif c.install.method == "archive" %}
apigee-mtls-install-consul-archive-extracted:
  archive.extracted:
    - name: /opt/consul-{{ c.version }}
    - source: {{ c.install.source }}
    - source_hash: {{ c.install.source_hash }}
    - enforce_toplevel: False
    - user: root
    - group: root

apigee-mtls-install-consul-binary-managed:
  file.symlink:
    - name: {{ c.bin }}
    - target: /opt/consul-{{ c.version }}/consul
    - force: True
    - require:
      - archive: apigee-mtls-install-consul-archive-extracted
{%- else %}
apigee-mtls-install-consul-binary-managed:
  pkg.installed:
    - name: {{ c.install.name }}
    {%- if c.install.get("version") %}
    - version: {{ c.install.version }}
    {%- endif %}
{%- endif %}

apigee-mtls-install-config-dir-managed:
  file.directory:
    - name: {{ c.config_dir }}
    - user: root
    - group: {{ c.group }}
    - mode: "0750"
    - require:
      - group: apigee-mtls-install-group-present

apigee-mtls-install-tls-dir-managed:
  file.directory:
    - name: {{ c.tls_dir }}
    - user: root
    - group: {{ c.group }}
    - mode: "0750"
    - require:
      - file: apigee-mtls-install-config-dir-managed

apigee-mtls-install-data-dir-managed:
  file.directory:
    - name: {{ c.data_dir }}
    - user: {{ c.user }}
    - group: {{ c.group }}
    - mode: "0750"
    - require:
      - user: apigee-mtls-install-user-present

apigee-mtls-install-state-dir-managed:
  file.directory:
    - name: {{ params.state_dir }}
    - user: root
    - group: root
    - mode: "0755"
{%- endif %}
