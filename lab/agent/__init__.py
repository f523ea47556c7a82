"""What runs inside the guest, next to the kernel under test: standard library and pyroute2 only.

The guest image ships this package and nothing else of lab/ (lab.image), and
its key hashes only these files; tests/test_agent_boundary.py holds both to it.

    agent       the agent: one scenario run, JSON events on stdout (python -m lab.agent)
    topology    veth/netns topologies with pyroute2; nskeeper holds each namespace
    dataplane   the C data plane's argv builders and its output protocol
    tracer      the ftrace flight recorder, and the in-guest trace scan
    jsonable    dataclasses to JSON and back (the AgentSpec on its way in)
    run         run(), spawn() and the typed errors, shared with the host (lab.run)
"""
