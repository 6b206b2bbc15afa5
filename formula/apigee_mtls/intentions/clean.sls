{#- Intentions live in the Consul servers' raft store: they go with the servers' data dirs. -#}
apigee-mtls-intentions-clean-nop:
  test.nop:
    - name: intentions are removed with the Consul servers' data
