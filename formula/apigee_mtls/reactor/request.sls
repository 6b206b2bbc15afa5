{#- Reactor for the tag apigee_mtls/request (master config, README "Using it on a real
    cluster", step 2): a node asks the signer for its agent certificate or its ACL token
    (apigee_mtls.ask_signer). The signer answers it with apigee_mtls.answer_request, for the
    requester the master stamped on the event (data.id), never a name from the request.
    Event data: id, and data with request_id, signer, fun, request. Renders nothing for anything
    else (and when applied as a state). #}
{%- set req = data.get('data') if data is defined and data.get('data') is mapping else {} %}
{%- if data is defined and data.get('id') and req.get('signer') is string
      and req.get('fun') in ['sign_agent_certificate', 'issue_acl_token'] %}
apigee-mtls-reactor-request-answered:
  local.apigee_mtls.answer_request:
    - tgt: {{ req['signer'] | tojson }}
    - tgt_type: list
    - args:
      - requester: {{ data['id'] | tojson }}
      - fun: {{ req['fun'] | tojson }}
      - request_id: {{ req.get('request_id', '') | string | tojson }}
      - request: {{ (req.get('request') if req.get('request') is mapping else {}) | tojson }}
{%- endif %}
