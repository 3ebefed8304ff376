"""Every registered strategy passes the core's PromptStrategyContract."""

from apportion.testing.contracts import PromptStrategyContract


class TestKNN(PromptStrategyContract):
    component = "knn"


class TestLatent(PromptStrategyContract):
    component = "latent"


class TestDynaICL(PromptStrategyContract):
    component = "dynaicl"


class TestAdaptMI(PromptStrategyContract):
    component = "adaptmi"


class TestAdaptMIPlus(PromptStrategyContract):
    component = "adaptmi-plus"


class TestRecycle(PromptStrategyContract):
    component = "recycle"


class TestPrune(PromptStrategyContract):
    component = "prune"


class TestDRAG(PromptStrategyContract):
    component = "drag"


class TestIterDRAG(PromptStrategyContract):
    component = "iterdrag"
    options = {"n": 2}


class TestVerifyLoop(PromptStrategyContract):
    component = "verify-loop"
    options = {"rounds": 2, "answer_tokens": 8}


class TestStructurize(PromptStrategyContract):
    component = "structurize"
