{#- Uninstall, in reverse order: firewall chains first (components reachable directly again),
    then sidecars, agent, config, certificates, binary and (unless pillar says keep) the user. -#}
include:
  - apigee_mtls.intentions.clean
  - apigee_mtls.firewall.clean
  - apigee_mtls.mesh.clean
  - apigee_mtls.service.clean
  - apigee_mtls.config.clean
  - apigee_mtls.tls.clean
  - apigee_mtls.install.clean
