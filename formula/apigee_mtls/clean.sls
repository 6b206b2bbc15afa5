{#- Uninstall, in reverse order: firewall chains first (components reachable directly again),
    then sidecars, agent, config, certificates, binary and (unless pillar says keep) the user. -#}
include:
  - apigee_mtls.keyring.clean
  - apigee_mtls.intentions.clean
  - apigee_mtls.firewall.clean
  - apigee_mtls.mesh.clean
  - apigee_mtls.service.clean
  - apigee_mtls.acl.clean
  - apigee_mtls.config.clean
  - apigee_mtls.tls.clean
  - apigee_mtls.install.clean

{#- Last: Consul exits 1 on SIGTERM when it does not leave (servers keep their raft
    membership), so a stopped agent is "failed", and the states above may load units systemd
    then keeps listed: forget every unit the formula had. (A unit file-less, inactive unit
    may stay listed as "not-found inactive dead", like home.mount: that is systemd's
    bookkeeping of a name, not an installed unit.) #}
apigee-mtls-clean-systemd-forget:
  cmd.run:
    - name: systemctl stop apigee-mtls-firewall.service 2>/dev/null; systemctl daemon-reload; systemctl reset-failed consul.service 'apigee-mtls-*' 2>/dev/null; systemctl stop 'system-apigee\x2dmtls\x2dproxy.slice' 2>/dev/null; true
    - onlyif: systemctl list-units --all --no-legend --plain 'consul.service' 'apigee-mtls-*' 'system-apigee*' | grep -v 'not-found *inactive *dead' | grep -q .
    - order: last
