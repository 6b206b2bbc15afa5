{#- Nothing on disk: the CA configuration lives in Consul's data (removed by install.clean). -#}
apigee-mtls-connect-ca-clean:
  test.nop: []
