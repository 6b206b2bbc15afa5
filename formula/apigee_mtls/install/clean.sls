{%- from "apigee_mtls/map.jinja" import params, plan with context %}
{%- set c = plan.get("consul") or {"bin": "/usr/local/bin/consul", "config_dir": "/etc/consul.d", "data_dir": "/var/lib/consul", "user": "consul", "group": "consul", "keep_user": False, "install": {"method": "binary"}, "version": "1.8.7"} %}
include:
  - apigee_mtls.service.clean

{%- if c.install.method == "pkg" %}
apigee-mtls-install-consul-binary-absent:
  pkg.removed:
    - name: {{ c.install.name }}
    - require:
      - sls: apigee_mtls.service.clean
{%- else %}
apigee-mtls-install-consul-binary-absent:
  file.absent:
    - name: {{ c.bin }}
    - require:
      - sls: apigee_mtls.service.clean

apigee-mtls-install-consul-archive-absent:
  file.absent:
    - name: /opt/consul-{{ c.version }}
    - require:
      - sls: apigee_mtls.service.clean
{%- endif %}

{%- for d in [c.config_dir, c.data_dir, params.state_dir] %}
apigee-mtls-install-dir-absent-{{ loop.index }}:
  file.absent:
    - name: {{ d }}
    - require:
      - sls: apigee_mtls.service.clean
{%- endfor %}

{%- if not c.keep_user %}
apigee-mtls-install-user-absent:
  user.absent:
    - name: {{ c.user }}
    - require:
      - sls: apigee_mtls.service.clean

apigee-mtls-install-group-absent:
  group.absent:
    - name: {{ c.group }}
    - require:
      - sls: apigee_mtls.service.clean
      - user: apigee-mtls-install-user-absent
{%- endif %}
