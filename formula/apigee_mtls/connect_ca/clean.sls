{#- Nothing on disk: the CA configuration lives in Consul's data (removed by service.clean). -#}
apigee-mtls-connect-ca-clean:
  test.nop: []
