{#- The gossip keyring follows apigee_mtls:secrets:gossip_key: a new key is installed on every
    node, made primary, and the old one removed (consul keyring), from the signer, once for
    the cluster. encrypt.json only seeds the keyring of an agent's first start.
    A node that was off during a rotation comes back with the old key only, cut off from its
    peers, and no cluster-wide rotation reaches it: every node first checks its own keyring
    (apigee_mtls.local_keyring_managed) and, when it lacks the pillar key as primary AND sees
    fewer than half of its peers alive, rewrites it (the pillar key first) and restarts its
    agent. On the signer this runs before the rotation. -#}
{%- from "apigee_mtls/map.jinja" import plan with context %}
{%- if plan.member %}
{%- set is_signer = plan.signer == grains.id %}
{#- the signer rotates after its own firewall cut off any node dropped from the pillar: such a
    node then fails, is forced out, and cluster-wide keyring queries answer again #}
{%- set after_firewall = is_signer and salt["apigee_mtls.rollout_stage"]() in ("redirect", "full") %}
{%- if plan.keyring or is_signer %}
include:
  - apigee_mtls.service
{%- if plan.acl.enabled or is_signer %}
  - apigee_mtls.acl
{%- endif %}
{%- if after_firewall %}
  - apigee_mtls.firewall
{%- endif %}
{%- endif %}
{%- if plan.keyring %}

apigee-mtls-keyring-local-managed:
  apigee_mtls.local_keyring_managed:
    - key_pillar: apigee_mtls:secrets:gossip_key
    - data_dir: {{ plan.consul.data_dir }}
    - server: {{ plan.keyring.server }}
    - peers: {{ plan.keyring.peers | json }}
    - user: {{ plan.consul.user }}
    - group: {{ plan.consul.group }}
{%- if plan.acl.enabled %}
    {#- the agent's local master token reads every member without the servers (which a
        cut-off node cannot reach); a node token would resolve through them #}
    - token_file: {{ plan.acl.agent_master_token_file }}
{%- endif %}
    - require:
      - service: apigee-mtls-service-running
{%- if plan.acl.enabled and not plan.acl.tokens_before_start %}
    {#- a cut-off node cannot check its token ("No known Consul servers"): repair first #}
    - require_in:
      - apigee_mtls: apigee-mtls-acl-agent-token-managed
{%- endif %}
{%- endif %}
{%- if is_signer %}

{#- a node dropped from the pillar without clean stays a failed member (72 h), and every
    cluster-wide keyring query would fail on it: the signer forces it out first #}
apigee-mtls-keyring-members-pruned:
  apigee_mtls.members_pruned:
    - nodes: {{ (plan.keyring.peers + [plan.node.id]) | json }}
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.management_token_file }}
{%- endif %}
    - require:
      - service: apigee-mtls-service-running
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
{%- if after_firewall %}
      - apigee_mtls: apigee-mtls-firewall-stale-connections-closed
{%- endif %}

apigee-mtls-keyring-managed:
  apigee_mtls.gossip_keyring_managed:
    - key_pillar: apigee_mtls:secrets:gossip_key
    - nodes: {{ (plan.keyring.peers + [plan.node.id]) | json }}
{%- if plan.acl.enabled %}
    - token_file: {{ plan.acl.management_token_file }}
{%- endif %}
    - require:
      - service: apigee-mtls-service-running
      - apigee_mtls: apigee-mtls-keyring-members-pruned
{%- if after_firewall %}
      - apigee_mtls: apigee-mtls-firewall-stale-connections-closed
{%- endif %}
{%- if plan.keyring %}
      # a signer that was off during a rotation repairs its own keyring before rotating
      - apigee_mtls: apigee-mtls-keyring-local-managed
{%- endif %}
{%- if plan.acl.enabled %}
      - apigee_mtls: apigee-mtls-acl-bootstrapped
{%- endif %}
{%- endif %}
{%- endif %}
