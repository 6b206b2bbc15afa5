# apigee_mtls: developer entry points. Everything runs as root (the lab boots machines).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TOPOLOGY ?= tests/topologies/5-node.yaml
# what runs as the datastores: standin (every component a stand-in) or real (ZooKeeper,
# PostgreSQL and OpenLDAP from Debian 12 in place of theirs: lab/real.py)
COMPONENTS ?= standin
# the sidecars' data plane of the lab's pillar (proxy:data_plane): builtin (Consul 1.8's
# proxy) or envoy (README "Data planes")
DATA_PLANE ?= builtin
export LAB_DATA_PLANE ?= $(DATA_PLANE)
export LAB_STATE ?= /var/lib/apigee-mtls-lab
export LAB_CACHE ?= /var/cache/apigee-mtls-lab

.PHONY: help venv lab lab-down lab-status test unit lab-test lab-test-topologies lab-test-real bench day2-report clean

help:
	@echo "make lab        boot the lab ($(TOPOLOGY)) and run salt '*' state.apply apigee_mtls"
	@echo "                (COMPONENTS=real: real ZooKeeper, PostgreSQL, OpenLDAP from Debian;"
	@echo "                 DATA_PLANE=envoy: Envoy in place of Consul 1.8's built-in proxy)"
	@echo "make lab-down   remove every machine, link, mount and process the lab created"
	@echo "make test       every test: unit tests, then the lab tests (boots its own lab)"
	@echo "make bench      benchmarks: prints a table, writes bench/results.json"
	@echo "make day2-report  the day-2 operations under traffic (after the lab tests): table + bench/day2.json"

venv: $(VENV)/.complete
$(VENV)/.complete: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

lab: venv
	$(PY) lab/labctl.py up --topology $(TOPOLOGY) --components $(COMPONENTS)

lab-down: venv
	$(PY) lab/labctl.py down

lab-status: venv
	$(PY) lab/labctl.py status

unit: venv
	$(PY) -m pytest tests/unit -q

lab-test: venv
	$(PY) -m pytest tests/lab -v -x --durations=15

# The other supported topologies, each on a lab of its own: the 9- and 13-node single-DC ones
# and the 12-node two-data-center one (WAN federation) get the same flow and capture tests as
# the 5-node lab, plus the topology checks (membership per DC, WAN, leaders, cross-DC flows).
# The sessions named in REAL_TOPOLOGY_SESSIONS boot with COMPONENTS=real and run the real
# datastores' tests too, on the same boot (the flow tests probe those datastores in their own
# protocols).
TOPOLOGY_SESSIONS := 9-node 13-node 12-node-2dc
TOPOLOGY_TESTS := tests/lab/test_10_foundation.py::test_test_mode_on_fresh_nodes_previews_and_changes_nothing \
	tests/lab/test_10_foundation.py::test_first_apply_succeeds_everywhere \
	tests/lab/test_10_foundation.py::test_rerun_reports_zero_changes \
	tests/lab/test_10_foundation.py::test_no_secret_in_state_returns \
	tests/lab/test_15_topology.py \
	tests/lab/test_20_mesh.py::test_every_allowed_flow_reaches_the_right_component_through_the_mesh \
	tests/lab/test_20_mesh.py::test_capture_shows_only_tls_between_sidecars \
	tests/lab/test_99_teardown.py
# tests for two data centres only (the secondary's Connect CA), before the teardown
MULTI_DC_TESTS := tests/lab/test_16_secondary_ca.py
# the real datastores (issue 12), on a 5-node lab of their own booted with COMPONENTS=real and
# the Envoy data plane (half-close, leader failover, day-2 under traffic on Envoy; the 13- and
# 12-node real sessions run the built-in proxy)
REAL_TESTS := tests/lab/test_10_foundation.py::test_first_apply_succeeds_everywhere \
	tests/lab/test_10_foundation.py::test_rerun_reports_zero_changes \
	tests/lab/test_90_real_datastores.py \
	tests/lab/test_91_real_day2.py \
	tests/lab/test_93_data_plane_switch.py \
	tests/lab/test_99_teardown.py

# the real datastores on the topologies with two LDAP servers (replicating through the mesh):
# 13 nodes (LDAP apart from the management servers) and 12 nodes in two DCs (LDAP replication
# and the Postgres standby cross from dc-1 to dc-2), with the same ZooKeeper and Postgres
# proofs as on 5 nodes; run before the two-DC tests, which restart dc-2's Consul agents
REAL_TOPOLOGY_SESSIONS := 13-node 12-node-2dc
REAL_TOPOLOGY_TESTS := tests/lab/test_90_real_datastores.py tests/lab/test_92_real_ldap.py
# the primary's reboot, proven on 5 nodes (Envoy) and across data centres (12 nodes), is not
# run again on 13 nodes, whose Postgres pair is the 5-node lab's (one DC): CI time
PRIMARY_REBOOT_TEST := tests/lab/test_90_real_datastores.py::test_standby_catches_up_after_the_primary_node_reboots

test: venv
	$(PY) -m pytest tests -v --durations=40 $(addprefix --ignore=,$(MULTI_DC_TESTS)) \
	  --ignore=tests/lab/test_90_real_datastores.py --ignore=tests/lab/test_91_real_day2.py \
	  --ignore=tests/lab/test_92_real_ldap.py --ignore=tests/lab/test_93_data_plane_switch.py
	$(MAKE) lab-test-topologies
	$(MAKE) lab-test-real

lab-test-topologies: venv
	set -e; for t in $(TOPOLOGY_SESSIONS); do \
	  components=standin; tests="$(TOPOLOGY_TESTS)"; \
	  case " $(REAL_TOPOLOGY_SESSIONS) " in *" $$t "*) \
	    components=real; tests="$${tests% *} $(REAL_TOPOLOGY_TESTS) $${tests##* }";; esac; \
	  case $$t in *dc*) tests="$${tests% *} $(MULTI_DC_TESTS) $${tests##* }";; esac; \
	  deselect=; case $$t in 13-node) deselect="--deselect $(PRIMARY_REBOOT_TEST)";; esac; \
	  echo "=== topology $$t (COMPONENTS=$$components) ==="; \
	  LAB_COMPONENTS=$$components TOPOLOGY=tests/topologies/$$t.yaml \
	    $(PY) -m pytest $$tests $$deselect -v --durations=5; \
	done

lab-test-real: venv
	@echo "=== real datastores (5-node, COMPONENTS=real, DATA_PLANE=envoy) ==="
	LAB_COMPONENTS=real LAB_DATA_PLANE=envoy TOPOLOGY=tests/topologies/5-node.yaml \
	  $(PY) -m pytest $(REAL_TESTS) -v --durations=5

bench: venv
	$(PY) bench/run.py
	$(PY) bench/day2_report.py --if-present

day2-report: venv
	$(PY) bench/day2_report.py

clean: lab-down
	rm -rf $(VENV)
