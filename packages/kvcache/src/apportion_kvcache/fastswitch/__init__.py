"""FastSwitch: fairness-aware serving with cheap context switches.

- :mod:`.blocks`: block-group allocation over real KV pools (and vLLM's per-block baseline)
- :mod:`.swap`: the asynchronous swap manager (copy, then commit)
- :mod:`.scheduler`: the fairness-aware preemptive scheduler
- :mod:`.simulator`: the trace-driven serving simulator with measured copy costs
- :mod:`.policy`: the ``fastswitch`` kv-policy (multi-turn reuse of host-kept KV)
"""
