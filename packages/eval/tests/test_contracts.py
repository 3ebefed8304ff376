"""Every benchmark this package registers passes the core's BenchmarkContract."""

from apportion.testing.contracts import BenchmarkContract


class TestNiah(BenchmarkContract):
    component = "niah"


class TestNiahMultiKeyUUID(BenchmarkContract):
    component = "niah"
    options = {"variant": "multi-key", "value_type": "uuid"}


class TestNiahMultiValueWords(BenchmarkContract):
    component = "niah"
    options = {"variant": "multi-value", "value_type": "word"}


class TestNiahMultiQuery(BenchmarkContract):
    component = "niah"
    options = {"variant": "multi-query"}


class TestVariableTracking(BenchmarkContract):
    component = "variable-tracking"
    options = {"num_chains": 2}


class TestNeedleThreading(BenchmarkContract):
    component = "needle-threading"


class TestNeedleThreadingMultiBackward(BenchmarkContract):
    component = "needle-threading"
    options = {"threads": 2, "direction": "backward", "key_format": "word"}


class TestHoloBench(BenchmarkContract):
    component = "holobench"
    small_options = {
        "lengths": [512, 1024],
        "samples": 1,
        "queries": ["lookup", "count", "max", "group-by"],
    }


class TestHoloBenchBimodal(BenchmarkContract):
    component = "holobench"
    options = {"placement": "bimodal", "density": 0.3, "queries": ["min", "sum", "avg"]}


class TestLongGen(BenchmarkContract):
    component = "longgen"


class TestContextAwareness(BenchmarkContract):
    component = "context-awareness"


class TestContextAwarenessTestSplitShort(BenchmarkContract):
    component = "context-awareness"
    options = {"split": "test", "instruction": "Answer in one word."}
    small_options = {"lengths": [256, 512], "samples": 1}


class TestCwe(BenchmarkContract):
    component = "cwe"


class TestFwe(BenchmarkContract):
    component = "fwe"


class TestMultiHopQA(BenchmarkContract):
    component = "multihop-qa"


class TestMultiHopQAThreeHopsShuffled(BenchmarkContract):
    component = "multihop-qa"
    options = {"hops": 3, "distractors": 4, "order": "shuffled"}


class TestGraphTracing(BenchmarkContract):
    component = "graph-tracing"


class TestGraphTracingGrid(BenchmarkContract):
    component = "graph-tracing"
    options = {"graph": "grid", "num_nodes": 9, "separator": " "}
