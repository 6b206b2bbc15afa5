{#- Reactor for the tag apigee_mtls/answer (master config, README "Using it on a real
    cluster", step 2): the signer's answer handed to the requester
    (apigee_mtls.accept_answer), with the sender the master stamped on the event (data.id):
    the requester takes only an answer whose sender is its signer, to a request it made.
    Event data: id, and data with requester, request_id, answer. Renders nothing for anything
    else (and when applied as a state). #}
{%- set ans = data.get('data') if data is defined and data.get('data') is mapping else {} %}
{%- if data is defined and data.get('id') and ans.get('requester') is string
      and ans.get('request_id') %}
apigee-mtls-reactor-answer-delivered:
  local.apigee_mtls.accept_answer:
    - tgt: {{ ans['requester'] | tojson }}
    - tgt_type: list
    - args:
      - sender: {{ data['id'] | tojson }}
      - request_id: {{ ans['request_id'] | string | tojson }}
      - answer: {{ ans.get('answer') | tojson }}
{%- endif %}
