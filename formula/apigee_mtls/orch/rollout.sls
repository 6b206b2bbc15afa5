{#- Zero-downtime rollout (or re-rollout after apigee_mtls.clean) of the mesh, from the master:

        salt-run state.orchestrate apigee_mtls.orch.rollout

    For clusters whose components keep running (and connecting) during the rollout. Each step
    runs apigee_mtls on its targets with apigee_mtls_rollout:stage passed inline, waits until
    apigee_mtls.verify passes everywhere, and stops the orchestration at the first failure
    (a minion that does not return fails its step):

      1. servers   the Consul servers (the zookeeper nodes): agents only;
      2. agents    every node: agents (clients join the servers);
      3. mesh      every node: sidecars, intentions, keyring; no iptables rule yet, so
                   components still connect directly; wait: every sidecar passing and every
                   upstream answering through the mesh;
      4. redirect  every node: nat redirects (new connections go through the mesh) and the
                   member rules; direct connections are still accepted, so a node that is not
                   redirected yet still reaches the others;
      5. lockdown  every node: the plain, full state (meshed ports accept only the sidecars;
                   connections opened before keep working: ESTABLISHED is accepted first);
                   wait: apigee_mtls.verify passes everywhere.

    A plain `salt '*' state.apply apigee_mtls` afterwards changes nothing. -#}
{%- set nodes = salt["pillar.get"]("apigee_mtls:nodes", []) %}
{%- set members = [] %}
{%- set servers = [] %}
{%- for node in nodes if not node.get("retired") %}
{%-   do members.append(node.id) %}
{%-   if "zookeeper" in node.get("components", []) %}
{%-     do servers.append(node.id) %}
{%-   endif %}
{%- endfor %}
{%- if not members %}
apigee-mtls-orch-no-nodes:
  test.fail_without_changes:
    - name: "apigee_mtls:nodes is empty in the master's pillar: nothing to roll out"
{%- else %}
{%- set steps = [
      ("servers", servers, "agents", None),
      ("agents", members, "agents", None),
      ("mesh", members, "mesh", {"firewall": False}),
      ("redirect", members, "redirect", {"lockdown": False}),
      ("lockdown", members, None, {}),
    ] %}
{%- set previous = [] %}
{%- for name, targets, stage, verify in steps %}
apigee-mtls-orch-{{ name }}-applied:
  salt.state:
    - tgt: {{ targets | json }}
    - tgt_type: list
    - sls: apigee_mtls
    - failhard: True
{%-   if stage %}
    - pillar: {{ {"apigee_mtls_rollout": {"stage": stage} } | json }}
{%-   endif %}
{%-   if previous %}
    - require:
      - salt: {{ previous[-1] }}
{%-   endif %}
{%-   do previous.append("apigee-mtls-orch-" ~ name ~ "-applied") %}
{%-   if verify is not none %}

apigee-mtls-orch-{{ name }}-verified:
  salt.function:
    - name: apigee_mtls.verify
    - tgt: {{ targets | json }}
    - tgt_type: list
    - failhard: True
{%-     if verify %}
    - kwarg: {{ verify | json }}
{%-     endif %}
    - retry:
        attempts: 40
        interval: 3
    - require:
      - salt: {{ previous[-1] }}
{%-     do previous.append("apigee-mtls-orch-" ~ name ~ "-verified") %}
{%-   endif %}
{%- endfor %}
{%- endif %}
