{#- The keyring lives in the agents' data dirs: it goes with them (install.clean). -#}
apigee-mtls-keyring-clean-nop:
  test.nop:
    - name: the gossip keyring is removed with the Consul data dirs
